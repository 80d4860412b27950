"""Cut the pretraining subset out of the seq-monkey corpus: by default the first 1,000,000 valid lines, and the
next 2,000 as a held-out validation file. Reads the downloaded .tar.bz2 directly (no 31 GB unpacking).

    python make_subset.py                                   # data/seq_monkey_1M.jsonl + data/seq_monkey_val.jsonl
    python make_subset.py --lines 100000 --sample --seed 1  # a seeded uniform sample instead of the first lines
"""
import argparse
import sys
import time

from seqlm import paths
from seqlm.corpus import BadLine, CorruptInput
from seqlm.subset import NotEnoughLines, make_subset


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=paths.CORPUS_ARCHIVE, help="corpus: .jsonl, .jsonl.gz/.bz2 or .tar.bz2/.tar.gz (default: %(default)s)")
    p.add_argument("--output", default=paths.TRAIN_SUBSET, help="training subset to write (default: %(default)s)")
    p.add_argument("--lines", type=int, default=1_000_000, help="exact number of training lines (default: %(default)s)")
    p.add_argument("--val-output", default=paths.VALIDATION_SUBSET, help="validation file to write (default: %(default)s)")
    p.add_argument("--val-lines", type=int, default=2_000, help="held-out lines, disjoint from the subset; 0 for none (default: %(default)s)")
    p.add_argument("--sample", action="store_true", help="a seeded uniform sample of the whole corpus instead of its first lines (reads it twice)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    args = p.parse_args()

    start = time.perf_counter()
    try:
        stats = make_subset(args.input, args.output, args.lines, args.val_output, args.val_lines,
                            sample=args.sample, seed=args.seed, strict=args.strict)
    except (FileNotFoundError, BadLine, CorruptInput, NotEnoughLines, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, FileNotFoundError):
            print("hint: run `python download_dataset.py --corpus`, or pass --input PATH", file=sys.stderr)
        return 1
    print(stats.summary())
    outputs = f"{args.output} ({args.lines:,} lines)"
    if args.val_lines:
        outputs += f" and {args.val_output} ({args.val_lines:,} lines)"
    print(f"wrote {outputs} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
