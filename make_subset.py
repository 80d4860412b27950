"""Cut the pretraining subset out of the seq-monkey corpus: by default the first 1,000,000 valid lines, and the
next 2,000 as a held-out validation file. Reads the downloaded .tar.bz2 directly (no 31 GB unpacking). With
--schema sft, the same for the BELLE conversations that finetune.sh trains on.

    python make_subset.py                                   # data/seq_monkey_1M.jsonl + data/seq_monkey_val.jsonl
    python make_subset.py --lines 100000 --sample --seed 1  # a seeded uniform sample instead of the first lines
    python make_subset.py --schema sft                      # BELLE: data/belle_sft.jsonl + data/belle_sft_val.jsonl
"""
import argparse
import sys
import time

from seqlm import paths
from seqlm.data.conversation import parse_conversation
from seqlm.data.corpus import BadLine, CorruptInput, parse_line
from seqlm.data.subset import NotEnoughLines, make_subset

# --schema: how each line is validated, the default files and sizes, and the download_dataset.py flag of the input
SCHEMAS = {
    "text": dict(parse=parse_line, input=paths.CORPUS_ARCHIVE, output=paths.TRAIN_SUBSET, lines=1_000_000,
                 val_output=paths.VALIDATION_SUBSET, val_lines=2_000, download="--corpus"),
    "sft": dict(parse=parse_conversation, input=paths.SFT_FILE, output=paths.SFT_SUBSET, lines=100_000,
                val_output=paths.SFT_VALIDATION_SUBSET, val_lines=1_000, download="--sft"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schema", choices=SCHEMAS, default="text",
                   help='what a valid line is: text, a pretraining document {"text"} (default); sft, a conversation '
                        '{"conversations": [{"from", "value"}]} or {"messages": [{"role", "content"}]}')
    p.add_argument("--input", help="corpus: .jsonl, .jsonl.gz/.bz2 or .tar.bz2/.tar.gz "
                                   f"(default: {paths.CORPUS_ARCHIVE}; sft: {paths.SFT_FILE})")
    p.add_argument("--output", help=f"training subset to write (default: {paths.TRAIN_SUBSET}; sft: {paths.SFT_SUBSET})")
    p.add_argument("--lines", type=int, help="exact number of training lines (default: 1,000,000; sft: 100,000)")
    p.add_argument("--val-output", help="validation file to write "
                                        f"(default: {paths.VALIDATION_SUBSET}; sft: {paths.SFT_VALIDATION_SUBSET})")
    p.add_argument("--val-lines", type=int,
                   help="held-out lines, disjoint from the subset; 0 for none (default: 2,000; sft: 1,000)")
    p.add_argument("--sample", action="store_true", help="a seeded uniform sample of the whole corpus instead of its first lines (reads it twice)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p.add_argument("--keep-partial", action="store_true",
                   help="if the archive turns out damaged, keep the lines read before the damage (exit code still 1)")
    args = p.parse_args()
    schema = SCHEMAS[args.schema]
    for name in ("input", "output", "lines", "val_output", "val_lines"):
        if getattr(args, name) is None:
            setattr(args, name, schema[name])

    start = time.perf_counter()
    try:
        stats = make_subset(args.input, args.output, args.lines, args.val_output, args.val_lines,
                            sample=args.sample, seed=args.seed, strict=args.strict, parse=schema["parse"],
                            keep_partial=args.keep_partial)
    except (FileNotFoundError, BadLine, CorruptInput, NotEnoughLines, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, FileNotFoundError):
            print(f"hint: run `python download_dataset.py {schema['download']}`, or pass --input PATH", file=sys.stderr)
        return 1
    print(stats.summary())
    outputs = f"{args.output} ({args.lines:,} lines)"
    if args.val_lines:
        outputs += f" and {args.val_output} ({args.val_lines:,} lines)"
    print(f"wrote {outputs} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
