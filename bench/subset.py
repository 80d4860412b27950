"""make_subset.py against `head -n` on a multi-GB plain .jsonl corpus held in the page cache: both copy the first
LINES lines, make_subset.py validating each one as well. Builds the corpus (real People's Daily text, repeated, about
3 KB a line) in WORKDIR if it is not there yet, checks that both outputs are identical, prints a Markdown table.

    python -m bench.subset                               # 1,000,000 documents (≈ 3 GB), the first 750,000 lines
    python -m bench.subset --docs 700000 --repeat 5      # ≈ 2 GB, best of 5 runs of each
"""
import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seqlm.data.demo import write_demo_corpus
from seqlm.evaluation.provenance import provenance
from seqlm.paths import REPO


def timed(command: list[str] | str, shell: bool = False) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, shell=shell, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"failed: {command}\n{result.stderr}")
    return seconds


def starts(corpus: Path, output: Path) -> bool:
    """Whether `output` is the beginning of `corpus`, byte for byte."""
    with open(output, "rb") as a, open(corpus, "rb") as b:
        while chunk := a.read(1 << 24):
            if chunk != b.read(len(chunk)):
                return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000, help="corpus lines (default: %(default)s, ≈ 3 GB)")
    p.add_argument("--lines", type=int, help="lines to copy (default: three quarters of --docs)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "seqlm-bench-subset",
                   help="where the corpus is kept and the outputs written (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each tool, alternating; the best counts "
                                                         "(default: %(default)s)")
    args = p.parse_args()
    lines = args.lines or args.docs * 3 // 4
    if not 0 < lines <= args.docs:
        p.error("--lines must be between 1 and --docs")

    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.workdir / f"corpus-{args.docs}.jsonl"
    if not corpus.exists():
        write_demo_corpus(corpus, args.docs)
    with open(corpus, "rb") as f:  # into the page cache, so that neither tool reads the disk
        while f.read(1 << 24):
            pass

    output = args.workdir / "subset.jsonl"
    tools = {
        "head -n": (f"head -n {lines} {shlex.quote(str(corpus))} > {shlex.quote(str(output))}", True),
        "make_subset.py": ([sys.executable, "make_subset.py", "--input", str(corpus), "--output", str(output),
                            "--lines", str(lines), "--val-lines", "0"], False),
    }
    runs: dict[str, list[float]] = {tool: [] for tool in tools}
    sizes = set()
    for _ in range(args.repeat):
        for tool, (command, shell) in tools.items():
            runs[tool].append(timed(command, shell))
            # both outputs are the corpus's first bytes, as many; removed at once, so that every run starts with
            # the same memory free (a run that has to evict pages from the page cache is slower)
            if not starts(corpus, output):
                sys.exit(f"the output of {tool} is not the start of {corpus}")
            sizes.add(output.stat().st_size)
            output.unlink()
    if len(sizes) > 1:
        sys.exit(f"outputs of different sizes: {sorted(sizes)}")
    megabytes = sizes.pop() / 1e6

    print(f"Copying the first {lines:,} lines ({megabytes:,.0f} MB) of {corpus} ({corpus.stat().st_size / 1e6:,.0f} MB)"
          f", page cache warm, best of {args.repeat}.")
    print(f"{provenance()}\n")
    print("| tool | seconds | MB/s | speed ratio to head | all runs (s) |")
    print("|---|---|---|---|---|")
    best_head = min(runs["head -n"])
    for tool, seconds in runs.items():
        best = min(seconds)
        print(f"| {tool} | {best:.2f} | {megabytes / best:,.0f} | {best_head / best:.2f} | "
              f"{', '.join(f'{s:.2f}' for s in seconds)} |")


if __name__ == "__main__":
    main()
