"""Score any HF causal LM checkpoint on standard benchmarks with EleutherAI's lm-evaluation-harness, on GPU or CPU,
offline: accuracy, chance level and centered accuracy per task, the suite's average, and the held-out bits per byte
next to ours. Writes OUTPUT_DIR/benchmarks.json and benchmarks.md.

    python download_dataset.py --eval                             # once, where the hub is reachable: data/eval/
    python benchmark.py --model_path output/pretrain              # the default suite
    python benchmark.py --model_path output/sft --suite cloze     # tasks that move early in training
    python benchmark.py --model_path output/demo --suite local --heldout_file data/demo/val.jsonl

Suites and tasks: seqlm/evaluation/benchmarks.py. Task data are read from --eval_data_dir only; nothing is downloaded here.
"""
import os

# Everything a run reads is on disk: never wait on the hub (read when datasets and huggingface_hub are imported).
os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

from transformers import AutoModelForCausalLM  # noqa: E402

from seqlm import (
    outputs,  # noqa: E402
    paths,
)
from seqlm.data.conversation import is_chat_model  # noqa: E402
from seqlm.evaluation.benchmarks import (  # noqa: E402
    HELDOUT,
    SUITES,
    average_centered,
    cross_check,
    markdown,
    resolve,
    run_suite,
    write_results,
    write_task_files,
)
from seqlm.evaluation.heldout import score_file  # noqa: E402
from seqlm.model import check_compatible, document_separator, inference_device, inference_dtype, load_config  # noqa: E402
from seqlm.model_folder import check_model_folder  # noqa: E402
from seqlm.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_MAX_LENGTH = 2048


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(paths.PRETRAIN_OUTPUT), help="HF checkpoint folder (default: "
                   "%(default)s)")
    p.add_argument("--suite", default="default", help=f"a suite ({', '.join(SUITES)}) or benchmark names, comma-"
                   "separated (default: %(default)s)")
    p.add_argument("--heldout_file", default=str(paths.VALIDATION_SUBSET),
                   help=f"JSON Lines of {{\"text\": ...}} for {HELDOUT} (default: %(default)s)")
    p.add_argument("--eval_data_dir", default=str(paths.EVAL_DATA_DIR),
                   help="task data, as download_dataset.py --eval writes them (default: %(default)s)")
    p.add_argument("--output_dir", help="where benchmarks.json and benchmarks.md go (default: MODEL_PATH/benchmarks)")
    p.add_argument("--batch_size", type=int, default=8, help="requests per forward pass (default: %(default)s)")
    p.add_argument("--max_length", type=int, help="longest context in tokens; longer documents are scored in windows "
                   f"(default: the block size the checkpoint was trained with, else {DEFAULT_MAX_LENGTH} or the "
                   "model's max_position_embeddings, whichever is shorter)")
    p.add_argument("--limit", type=int, help="score at most the first N documents of each task (default: all)")
    p.add_argument("--chat_template", choices=["auto", "yes", "no"], default="auto",
                   help="ask C-Eval/CMMLU questions through the chat template: auto = when the checkpoint is "
                   "fine-tuned (its template ends turns with its eos token) (default: %(default)s)")
    p.add_argument("--token_cache_dir", default=str(paths.TOKEN_CACHE_DIR),
                   help="for our own bits per byte, beside lm-eval's (default: %(default)s)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    start = time.perf_counter()
    task_dir = tempfile.TemporaryDirectory(prefix="benchmark-tasks-")
    try:
        benchmarks = resolve(args.suite)
        check_model_folder(args.model_path)
        heldout = HELDOUT in [b.name for b in benchmarks]
        write_task_files(benchmarks, Path(task_dir.name), Path(args.eval_data_dir),
                         Path(args.heldout_file) if heldout else None)
        config = load_config(args.model_path)
        tokenizer = load_tokenizer(args.model_path)
        max_length = (args.max_length or outputs.trained_block_size(args.model_path)
                      or min(DEFAULT_MAX_LENGTH, config.max_position_embeddings))
        check_compatible(config, tokenizer, max_length, flag="--max_length")
        separator_id = document_separator(config)
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    chat = is_chat_model(tokenizer) if args.chat_template == "auto" else args.chat_template == "yes"
    device = inference_device()
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=inference_dtype(device, args.model_path),
                                                 device_map="cuda" if device == "cuda" else None)
    rows = run_suite(model, tokenizer, benchmarks, Path(task_dir.name), chat=chat, batch_size=args.batch_size,
                     max_length=max_length, prefix_token_id=separator_id, limit=args.limit)
    check = None
    if heldout and args.limit is None:  # ours always reads the whole file
        try:
            ours = score_file(model, tokenizer, separator_id, args.heldout_file, max_length, args.token_cache_dir,
                              args.batch_size)
            check = cross_check(next(r["value"] for r in rows if r["name"] == HELDOUT), ours["bits_per_byte"])
        except ValueError as e:  # a file shorter than one block
            print(f"no cross-check of the bits per byte: {e}", file=sys.stderr)
    task_dir.cleanup()

    result = dict(model_path=args.model_path, suite=args.suite, max_length=max_length, limit=args.limit,
                  chat_template=chat, device="cuda" if device == "cuda" else "cpu", lm_eval_version=metadata.version("lm_eval"),
                  rows=rows, average_centered=average_centered(rows), cross_check=check,
                  seconds=round(time.perf_counter() - start, 1))
    json_path, md_path = write_results(Path(args.output_dir or Path(args.model_path) / "benchmarks"), result)
    print("\n".join(["", *markdown(rows, check)]))
    print(f"{json_path}\n{md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
