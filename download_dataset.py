"""Download what pretraining needs into data/: the Qwen2.5-0.5B config + tokenizer and the seq-monkey corpus
(the default), the model weights, the BELLE SFT set and the benchmarks' task data on request. Reruns skip what is
there and resume the rest.

    python download_dataset.py                      # model config/tokenizer + corpus
    python download_dataset.py --sft               # only the SFT data
    python download_dataset.py --eval              # task data of every benchmark (benchmark.py), into data/eval/
    HF_ENDPOINT=https://hf-mirror.com python download_dataset.py --model --with-weights
"""
import argparse
import sys
from pathlib import Path

from seqlm import paths
from seqlm.data.download import (
    CORPUS_MD5,
    DownloadError,
    fetch_benchmark_data,
    fetch_corpus,
    fetch_model,
    fetch_sft,
    one_line_per_cause,
    rebase,
)
from seqlm.evaluation.benchmarks import BENCHMARKS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="store_true", help="config + tokenizer of Qwen/Qwen2.5-0.5B (Hugging Face)")
    parser.add_argument("--corpus", action="store_true", help="seq-monkey pretraining corpus archive (ModelScope)")
    parser.add_argument("--sft", action="store_true", help="BelleGroup/train_3.5M_CN SFT data, 4.85 GB (Hugging Face)")
    parser.add_argument("--eval", action="store_true", help="task data of the benchmarks (Hugging Face), a few MB")
    parser.add_argument("--with-weights", action="store_true", help="with --model: also *.safetensors (~1 GB)")
    parser.add_argument("--data-dir", type=Path, default=paths.DATA_DIR, help="instead of %(default)s/")
    parser.add_argument("--corpus-url", help="full URL of the corpus archive (default: ModelScope; MODELSCOPE_DOMAIN)")
    parser.add_argument("--corpus-md5", default=CORPUS_MD5, help="expected MD5 of the archive (default: %(default)s)")
    parser.add_argument("--no-verify", action="store_true", help="skip the corpus MD5 check")
    args = parser.parse_args()

    fetchers = {
        "model": lambda: fetch_model(rebase(paths.MODEL_DIR, args.data_dir), with_weights=args.with_weights),
        "corpus": lambda: fetch_corpus(rebase(paths.CORPUS_ARCHIVE, args.data_dir), url=args.corpus_url,
                                       md5=None if args.no_verify else args.corpus_md5),
        "sft": lambda: fetch_sft(rebase(paths.SFT_FILE.parent, args.data_dir)),
    }
    chosen = [name for name in fetchers if getattr(args, name)]
    default = [] if args.eval else ["model", "corpus"]  # what pretraining needs
    sources = [fetchers[name] for name in chosen or default]
    if args.eval:  # one source per benchmark dataset, each failing on its own line
        sources += [lambda b=b: fetch_benchmark_data(b.repo, b.data_patterns, b.revision,
                                                        rebase(paths.EVAL_DATA_DIR, args.data_dir))
                    for b in BENCHMARKS.values() if b.repo]
    errors = []
    for fetch in sources:  # one failing source should not stop the others (e.g. hub blocked, ModelScope reachable)
        try:
            fetch()
        except DownloadError as e:
            errors.append(e)
    for e in one_line_per_cause(errors):
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
