"""serve.py against plain `model.generate` on the same checkpoint, device and dtype: the tokens/s of one streamed
answer (greedy, so both generate the same tokens), then the total tokens/s of 1, 4 and 16 concurrent streams. Prints
a Markdown table.

    python -m bench.serve                                   # Qwen2.5-0.5B with random weights, built in WORKDIR
    python -m bench.serve --model_path output/sft           # any checkpoint with a chat template
    python -m bench.serve --continuous_batching             # the server batches concurrent streams (GPUs)

Random weights generate as fast as trained ones; what is measured is the serving, not the answers.
"""
import argparse
import concurrent.futures
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seqlm.data.conversation import prepare_chat_tokenizer, set_chat_eos
from seqlm.evaluation.provenance import provenance
from seqlm.model import inference_device, inference_dtype, load_config
from seqlm.paths import REPO
from seqlm.tokenizer import offline_tokenizer_dir

QUESTION = "请介绍一下长城。"


def build_checkpoint(preset: str, folder: Path) -> Path:
    """A random-weights chat checkpoint of `preset`, saved as finetune.sh saves one (reused if there)."""
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(load_config(preset))
        tokenizer = AutoTokenizer.from_pretrained(str(offline_tokenizer_dir()))
        prepare_chat_tokenizer(tokenizer, None)
        set_chat_eos(model, tokenizer)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"{QUESTION}（第{i}次）"}]


class Alone:
    """Plain model.generate, greedy, on the device and dtype serve.py picks, for the first prompt."""

    def __init__(self, path: Path):
        self.device = inference_device()
        tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = inference_dtype(self.device, str(path))
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.ids = tokenizer.apply_chat_template(messages(0), add_generation_prompt=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"].to(self.device)

    def __call__(self, max_tokens: int) -> int:
        """Its tokens."""
        out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=max_tokens,
                                  do_sample=False)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return out.shape[1] - self.ids.shape[1]


def timed(run, *args) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = run(*args)
    return time.perf_counter() - start, tokens


def stream(api: openai.OpenAI, i: int, max_tokens: int) -> int:
    """One streamed greedy answer to prompt i, read to the end; its tokens."""
    tokens = 0
    for chunk in api.chat.completions.create(model="bench", messages=messages(i), temperature=0,
                                             max_tokens=max_tokens, stream=True):
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return tokens


def concurrent_streams(api: openai.OpenAI, n: int, max_tokens: int) -> tuple[float, int]:
    """(seconds, tokens of all answers) for n streams started together."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        tokens = sum(pool.map(lambda i: stream(api, i, max_tokens), range(n)))
    return time.perf_counter() - start, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", type=Path, help="a chat checkpoint (default: --preset with random weights)")
    p.add_argument("--preset", default="qwen2.5-0.5b", help="architecture of the default checkpoint "
                                                             "(default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "seqlm-bench-serve",
                   help="where the default checkpoint is kept (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=64, help="tokens per answer (default: %(default)s)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels "
                                                                            "(default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="single-answer runs of each side, alternated; the best "
                                                         "counts (default: %(default)s)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--continuous_batching", action="store_true", help="passed to serve.py")
    args = p.parse_args()

    path = args.model_path or build_checkpoint(args.preset, args.workdir / args.preset)
    alone = Alone(path)  # idle while the server generates, as the server is while it generates

    command = [sys.executable, str(REPO / "serve.py"), "--model_path", str(path), "--name", "bench",
               "--port", str(args.port), *(["--continuous_batching"] if args.continuous_batching else [])]
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "serve.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"serve.py failed:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{args.port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused", max_retries=0,
                            timeout=3600)
        alone(args.max_tokens), stream(api, 0, args.max_tokens)  # warm-up
        # Alternated, so that both sides see the same machine (other work on it comes and goes); the best of each
        runs = [(timed(alone, args.max_tokens), timed(stream, api, 0, args.max_tokens)) for _ in range(args.repeat)]
        (alone_seconds, alone_tokens), _ = min(runs, key=lambda run: run[0][0])
        _, (served_seconds, tokens) = min(runs, key=lambda run: run[1][0])
        if tokens != alone_tokens:
            sys.exit(f"the server generated {tokens} tokens, model.generate {alone_tokens}: not the same answer")
        levels = {n: concurrent_streams(api, n, args.max_tokens) for n in args.streams}
    finally:
        server.terminate()
        server.wait(timeout=60)

    device = inference_device()
    dtype = inference_dtype(device, str(path))
    mode = "continuous batching" if args.continuous_batching else "one generation at a time"
    print(f"{path}: {device}, {str(dtype).removeprefix('torch.')}; {args.max_tokens} tokens an answer, greedy; "
          f"server: {mode}; best of {args.repeat}")
    print(f"{provenance()}\n")
    speed = alone_tokens / alone_seconds
    served = tokens / served_seconds
    print("| measure | tokens | seconds | tokens/s | vs model.generate |")
    print("|---|---:|---:|---:|---:|")
    print(f"| model.generate, one answer | {alone_tokens} | {alone_seconds:.2f} | {speed:.1f} | 1.00× |")
    print(f"| serve.py, one streamed answer | {tokens} | {served_seconds:.2f} | {served:.1f} | "
          f"{served / speed:.2f}× |")
    for n, (seconds, total) in levels.items():
        print(f"| serve.py, {n} concurrent streams | {total} | {seconds:.2f} | {total / seconds:.1f} | "
              f"{total / seconds / speed:.2f}× |")
    print(f"\nall single-answer runs (model.generate s / serve.py s): "
          f"{', '.join(f'{a[0]:.2f} / {b[0]:.2f}' for a, b in runs)}")


if __name__ == "__main__":
    main()
