"""Serve a checkpoint: an OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`, streamed or not) and a chat
page in the browser, on the engine of `transformers serve` (seqlm/serving/server.py says what is added to it).

    python serve.py                                  # output/sft (else output/pretrain) on http://127.0.0.1:8000
    python serve.py --model_path output/pretrain     # a pretrained checkpoint continues text (/v1/completions)
    SEQLM_API_KEY=$(openssl rand -hex 16) python serve.py --host 0.0.0.0   # reachable by others: with a key

Then open http://127.0.0.1:8000 for the chat page, or use any OpenAI client with base_url http://127.0.0.1:8000/v1.
"""
import argparse
import ipaddress
import os
import sys

from seqlm.serving.server import API_KEY_ENV, DEFAULT_CHECKPOINTS, Limits, cannot_listen, default_checkpoint


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", help="checkpoint folder or hub id (default: the first of "
                                        f"{', '.join(map(str, DEFAULT_CHECKPOINTS))} that is there)")
    p.add_argument("--name", help="the model's name in requests and /v1/models (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 opens it to all)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, mps, cpu (default: %(default)s: a GPU if any)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="(default: %(default)s: bfloat16 on GPUs that have it; on others float16 for a checkpoint trained in "
                        "float16, else float32, since float16 can overflow a model trained in bfloat16; float32 on CPU)")
    p.add_argument("--continuous_batching", action="store_true",
                   help="batch concurrent requests in the same forward passes (GPUs only). In transformers 5.24 "
                        "the sampling settings of the first request then apply to all, and repetition penalties "
                        "are dropped")
    p.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"the key every API request must send (Authorization: Bearer KEY; the chat page asks for it "
                        f"once). Prefer the environment variable {API_KEY_ENV}: a command line is visible to every "
                        f"user of the machine (ps). Default: {API_KEY_ENV}, else none")
    limits = Limits()
    p.add_argument("--max_prompt_chars", type=positive, default=limits.max_prompt_chars,
                   help="longest prompt (all messages) in characters, refused before it is tokenized "
                        "(default: %(default)s)")
    p.add_argument("--max_queue", type=natural, default=limits.max_queue,
                   help="generations that may wait behind the running one; past it a 429 with Retry-After "
                        "(default: %(default)s; with --continuous_batching transformers' scheduler takes all)")
    p.add_argument("--max_request_bytes", type=positive, default=limits.max_request_bytes,
                   help="largest request body, 413 past it (default: %(default)s)")
    return p.parse_args()


def natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive(text: str) -> int:
    value = natural(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0: it must be at least 1")
    return value


def main() -> int:
    args = parse_args()
    try:
        local = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        local = args.host == "localhost"
    if not local and not args.api_key:
        print(f"note: listening on {args.host} without an API key: anyone who can reach this machine can use the "
              f"model (set {API_KEY_ENV})", file=sys.stderr)
    problem = cannot_listen(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from seqlm.model import inference_device, inference_dtype
    from seqlm.model_folder import check_model_folder  # imports transformers: after the checks that need nothing

    device = inference_device(args.device)
    if args.continuous_batching and device.startswith("cpu"):
        # Measured: a Qwen2.5-0.5B server grew to 12.6 GB on a shared 24 GB machine and was killed for memory.
        print("error: --continuous_batching is for GPUs: on the CPU transformers sizes its cache to 60% of all RAM, "
              "whatever else runs", file=sys.stderr)
        return 2
    args.model_path = args.model_path or default_checkpoint()
    if args.model_path is None:
        print(f"error: no model folder {' nor '.join(map(str, DEFAULT_CHECKPOINTS))} (the defaults, in that order): "
              "train one (bash finetune.sh, bash pretrain.sh), or pass --model_path", file=sys.stderr)
        return 2
    try:
        check_model_folder(args.model_path)
        from seqlm.serving.server import ServedModel

        served = ServedModel.from_folder(args.model_path, args.name)
        # From --device's own GPU and the precision the checkpoint was trained in (Device.inference_dtype).
        dtype = str(inference_dtype(device, args.model_path)).removeprefix("torch.") if args.dtype == "auto" \
            else args.dtype
    except (OSError, ValueError) as e:  # ModelFolderError is a ValueError
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2

    import uvicorn

    from seqlm.serving.server import build_app

    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    kind = "chat" if served.chat else "continues text (no chat template): /v1/completions only"
    print(f"serving {served.name} ({served.path}; {kind}) on {device} in {dtype}, context {served.context:,} tokens")
    limits = Limits(api_key=args.api_key, max_prompt_chars=args.max_prompt_chars, max_queue=args.max_queue,
                    max_request_bytes=args.max_request_bytes)
    app = build_app(served, device=device, dtype=dtype, continuous_batching=args.continuous_batching, limits=limits)
    print(f"chat page: {url}/   OpenAI API: {url}/v1 (model '{served.name}')", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
