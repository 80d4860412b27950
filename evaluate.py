"""Score any HF causal LM checkpoint on held-out JSON Lines text ({"text": ...} per line, as seq-monkey): loss,
perplexity, and bits per character and per UTF-8 byte, which compare across tokenizers and block sizes.

    python evaluate.py --model_path output/pretrain --files data/seq_monkey_val.jsonl
    python evaluate.py --model_path output/demo --files data/demo/val.jsonl --output_json scores.json

The text is tokenized as for training (the token cache, each document ended by the model's eos_token_id) and cut
into blocks; every block predicts its tokens from those before it, as the held-out loss during training does.
"""
import argparse
import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

from seqlm import outputs, paths
from seqlm.evaluation.heldout import score_file
from seqlm.model import check_compatible, document_separator, inference_device, inference_dtype, load_config
from seqlm.model_folder import check_model_folder
from seqlm.tokenizer import load_tokenizer

DEFAULT_BLOCK_SIZE = 2048


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(paths.PRETRAIN_OUTPUT), help="HF checkpoint folder or hub id "
                   "(default: %(default)s)")
    p.add_argument("--files", nargs="+", default=[str(paths.VALIDATION_SUBSET)],
                   help="JSON Lines files of {\"text\": ...} (default: %(default)s)")
    p.add_argument("--tokenizer_name", help="tokenizer folder or hub id (default: the checkpoint's)")
    p.add_argument("--block_size", type=int, help="tokens per block (default: the block size the checkpoint was "
                   f"trained with, from {outputs.RUN_INFO_FILE}, else {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--batch_size", type=int, default=4, help="blocks per forward pass (default: %(default)s)")
    p.add_argument("--max_blocks", type=int, help="evaluate at most the first N blocks of each file (default: all); "
                   "bits per character and byte count the text of exactly those blocks")
    p.add_argument("--token_cache_dir", default=str(paths.TOKEN_CACHE_DIR), help="default: %(default)s")
    p.add_argument("--output_json", help="also write the scores to this JSON file")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    try:
        missing = [f for f in args.files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"no such file {', '.join(missing)}: pass --files with JSON Lines of "
                                    "{\"text\": ...} (make_subset.py writes data/seq_monkey_val.jsonl)")
        check_model_folder(args.model_path)
        config = load_config(args.model_path)
        tokenizer = load_tokenizer(args.tokenizer_name or args.model_path)
        args.block_size = args.block_size or outputs.trained_block_size(args.model_path) or DEFAULT_BLOCK_SIZE
        check_compatible(config, tokenizer, args.block_size)
        separator_id = document_separator(config)
        device = inference_device()
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=inference_dtype(device, args.model_path),
                                                     device_map="cuda" if device == "cuda" else None)
        scores = [score_file(model, tokenizer, separator_id, f, args.block_size, args.token_cache_dir, args.batch_size,
                             args.max_blocks) for f in args.files]
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1

    print(f"\n{args.model_path}, blocks of {args.block_size} tokens")
    print(f"{'file':<40} {'blocks':>13} {'loss':>7} {'perplexity':>11} {'bits/char':>10} {'bits/byte':>10}")
    for s in scores:
        evaluated = f"{s['blocks']:,}/{s['total_blocks']:,}"
        print(f"{s['file']:<40} {evaluated:>13} {s['loss']:>7.4f} {s['perplexity']:>11,.2f} "
              f"{s['bits_per_char']:>10.4f} {s['bits_per_byte']:>10.4f}")
    result = dict(model_path=args.model_path, block_size=args.block_size, files=scores)
    print(json.dumps(result, ensure_ascii=False))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
