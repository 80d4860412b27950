"""Write the run report of a training output dir: report.md with plots of the loss, held-out bits per character,
learning rate and throughput, the last samples, the configuration and the environment. pretrain.py writes it at the
end of a run; this writes it again, e.g. for a run still going, or cut short:

    python report.py output/pretrain
"""
import argparse
import sys

from seqlm import paths
from seqlm.evaluation.report import write_report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", nargs="?", default=str(paths.PRETRAIN_OUTPUT),
                   help="a training output dir (default: %(default)s)")
    args = p.parse_args()
    try:
        print(f"report: {write_report(args.output_dir)}")
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
