"""Whether a step of speedrun.sh has already made its output, judged by the output's own sign of completeness, so that
a rerun skips it: `python -m seqlm.training.speedrun CHECK ARGS...` prints what it found and exits 0 when the step is
done, 1 when it must run.

    written     PATH...                 each path is there: the steps that make them write each whole, under another
                                        name, and rename it into place once complete (seqlm.fileio.atomic_output; the
                                        corpus download only after its MD5 matched; the hub's files likewise)
    subset      FILE LINES              make_subset.py's output (renamed into place) with exactly LINES lines: a cut
                                        of another size is cut again
    tokenized   CACHE_DIR PRESET TOKENIZER FILE...  each file's token cache holds its manifest.json, written last
    trained     OUTPUT_DIR [MAX_STEPS]  the final trainer_state.json has reached its last step (MAX_STEPS, when given,
                                        else its own), and the report, written last, is there
    benchmarked FOLDER SUITE            benchmarks.json of that suite, written last
"""
from __future__ import annotations

import sys
from pathlib import Path

from seqlm import outputs


def written(*paths: str) -> tuple[bool, str]:
    missing = [p for p in paths if not Path(p).exists()]
    return not missing, f"missing {', '.join(missing)}" if missing else f"{', '.join(paths)} written"


def subset(file: str, lines: str) -> tuple[bool, str]:
    if not Path(file).is_file():
        return False, f"no {file}"
    with open(file, "rb") as f:
        count = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
    return count == int(lines), f"{file} holds {count:,} lines, {int(lines):,} asked"


def tokenized(cache_dir: str, preset: str, tokenizer: str, *files: str) -> tuple[bool, str]:
    from seqlm.data.token_cache import token_cache_is_built
    from seqlm.model import document_separator, load_config
    from seqlm.tokenizer import load_tokenizer

    loaded, separator = load_tokenizer(tokenizer), document_separator(load_config(preset))
    todo = [f for f in files if not (Path(f).is_file() and token_cache_is_built(f, loaded, separator, cache_dir))]
    return not todo, f"not yet in {cache_dir}: {', '.join(todo)}" if todo else f"{', '.join(files)} in {cache_dir}"


def trained(output_dir: str, max_steps: str = "") -> tuple[bool, str]:
    state = outputs.read_json(Path(output_dir) / outputs.TRAINER_STATE_FILE)
    if state is None:
        return False, f"no final model in {output_dir}"
    last = int(max_steps) if max_steps else state["max_steps"]
    report = (Path(output_dir) / outputs.REPORT_FILE).is_file()
    done = state["global_step"] >= last and report
    return done, f"{output_dir} at step {state['global_step']:,} of {last:,}" + ("" if report else ", no report yet")


def benchmarked(folder: str, suite: str) -> tuple[bool, str]:
    from seqlm.evaluation.benchmarks import BENCHMARKS_FILE

    result = outputs.read_json(Path(folder) / BENCHMARKS_FILE)
    if result is None:
        return False, f"no {BENCHMARKS_FILE} in {folder}"
    return result["suite"] == suite, f"{folder}/{BENCHMARKS_FILE} of the suite {result['suite']}"


CHECKS = {f.__name__: f for f in (written, subset, tokenized, trained, benchmarked)}


def main(argv: list[str]) -> int:
    check, *args = argv
    done, found = CHECKS[check](*args)
    print(f"done, skipped: {found}" if done else f"to do: {found}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
