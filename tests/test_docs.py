"""The documents say only what is true of the code: README.md, README_zh.md and the guides in docs/.

- every `--flag` they name exists: in the script a command line runs, or (in prose) in some script of this repository;
- every path of the repository and every make target they name exists, and every relative link and anchor resolves;
- every `python` / `bash` / `make` command line parses (shlex, then the script's own parser for the training scripts);
- each English document and its Chinese version have the same headings, level by level, in the same order;
- every measured figure is a link into docs/benchmarks.md or docs/reliability.md whose text is the figure, and the
  section it points to holds that figure, a date and a commit;
- the repository has no file called GUIDE, so no document quotes one.

Fast: no training, no model; the only import of weight is transformers' TrainingArguments, for the training scripts'
flags. The per-card table in docs/gpus.md is checked against the planner in tests/training/test_fit.py.
"""
import ast
import functools
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", REPO / "README_zh.md",
               *(p for p in (REPO / "docs").glob("*.md") if p.name not in ("benchmarks.md", "reliability.md"))])
MEASUREMENTS = ("benchmarks.md", "reliability.md")  # where measured figures stand, with date, commit and machine


def chinese_twin(path: Path) -> Path:
    return path.with_name("README_zh.md") if path.name == "README.md" else path.with_suffix(".zh.md")


PAIRS = [(p, chinese_twin(p)) for p in DOCS if not p.name.endswith(".zh.md") and p.name != "README_zh.md"]

# Features landing in parallel, documented under their final names. Once a name exists in the code, the test below
# asks for it to be removed from here, so that nothing stays excused.
PENDING_FILES = set()
PENDING_TARGETS = set()
PENDING_FLAGS = {}

# Tools that are not ours: their command lines are not checked, and flags of theirs named in prose are known here.
EXTERNAL_COMMANDS = {"ssh", "ollama", "llama-cli", "vllm", "cp", "apt-get", "pip", "swanlab", "hf", "deepspeed",
                     "source", "head", "nvidia-smi", "git"}
EXTERNAL_MODULES = {"deepspeed.checkpoint.ds_to_universal", "sglang.launch_server"}
EXTERNAL_FLAGS = {"--safe_serialization",  # DeepSpeed's zero_to_fp32.py, which each checkpoint carries
                  "--reverse", "--randomly-seed",  # pytest-reverse's and pytest-randomly's (make test PYTEST_ARGS=...)
                  "--me",  # squeue's
                  "--learnig_rate"}  # the misspelt flag the docs show refused
EXTERNAL_FILES = {"zero_to_fp32.py",  # inside every checkpoint folder, written by DeepSpeed
                  "convert_hf_to_gguf.py"}  # llama.cpp's converter, which make gguf-setup unpacks
ARGPARSE_SCRIPTS = ["serve.py", "chat.py", "evaluate.py", "benchmark.py", "report.py", "download_dataset.py", "export.py",
                    "make_subset.py", "seqlm/training/fit.py", *(f"bench/{p.name}" for p in (REPO / "bench").glob("*.py"))]
TRAINING_SCRIPTS = ["pretrain.py", "finetune.py", "tokenize_corpus.py"]
SHELL_TO_SCRIPT = {"pretrain.sh": "pretrain.py", "finetune.sh": "finetune.py"}

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"^(?:seqlm|tests|bench|configs|docs|prompts|\.ci)/[\w./*-]*$")
TOP_LEVEL_FILE = re.compile(r"^[\w.-]+\.(?:py|sh)$|^(?:Makefile|ds_config_zero2\.json|requirements[\w-]*\.txt|README[\w]*\.md)$")


# ---------------------------------------------------------------------------------------------------------- parsing

def split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The prose lines (code blocks blanked) and the code blocks, each with its language."""
    prose, blocks, lang, block = [], [], None, []
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if m and lang is None:
            lang, block = m.group(1), []
            prose.append("")
        elif line.strip() == "```" and lang is not None:
            blocks.append((lang, block))
            lang = None
            prose.append("")
        elif lang is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def headings(text: str) -> list[tuple[int, str]]:
    prose, _ = split_fences(text)
    return [(len(m.group(1)), m.group(2).strip()) for line in prose if (m := re.match(r"^(#{1,6})\s+(.*)$", line))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters of any script kept), spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> dict[str, str]:
    """Each anchor of a markdown file and the text of its section (to the next heading of the same or a higher level)."""
    lines = path.read_text().splitlines()
    prose, _ = split_fences(path.read_text())
    found, seen = {}, {}
    marks = [(i, len(m.group(1)), m.group(2)) for i, line in enumerate(prose) if (m := re.match(r"^(#{1,6})\s+(.*)$", line))]
    for k, (i, level, title) in enumerate(marks):
        end = next((j for j, lv, _ in marks[k + 1:] if lv <= level), len(lines))
        s = slug(title)
        n = seen.get(s, 0)
        seen[s] = n + 1
        found[s if n == 0 else f"{s}-{n}"] = "\n".join(lines[i:end])
    return found


def links(text: str) -> list[tuple[str, str]]:
    """The markdown links of the prose (not those shown as code)."""
    prose, _ = split_fences(text)
    return LINK.findall(INLINE.sub("", "\n".join(prose)))


def inline_spans(text: str) -> list[str]:
    prose, _ = split_fences(text)
    return INLINE.findall("\n".join(prose))


def command_lines(text: str) -> list[str]:
    """Shell command lines: the lines of bash code blocks (continuations joined) and inline spans that are commands."""
    _, blocks = split_fences(text)
    lines = []
    for lang, block in blocks:
        if lang not in ("bash", "sh", "shell", ""):
            continue
        joined = ""
        for line in block:
            joined += line.rstrip()
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            if joined.strip():
                lines.append(joined.strip())
            joined = ""
    lines += [s for s in inline_spans(text) if is_command(s)]
    return lines


def is_command(span: str) -> bool:
    try:
        words = [w for w in shlex.split(span, comments=True) if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
    except ValueError:
        return False
    return bool(words) and (words[0] in ("python", "bash", "make") or words[0] in EXTERNAL_COMMANDS)


def commands(line: str) -> list[list[str]]:
    """One shell line into its simple commands (split at && || ; |), leading VAR=value assignments dropped."""
    words = shlex.split(line, comments=True)
    out, current = [], []
    for w in words + ["&&"]:
        if w in ("&&", "||", ";", "|"):
            while current and re.match(r"^[A-Z_][A-Z0-9_]*=", current[0]):
                current.pop(0)
            if current:
                out.append(current)
            current = []
        else:
            current.append(w)
    return out


# ------------------------------------------------------------------------------------------- what the code offers

@functools.cache
def argparse_flags(script: str) -> set[str]:
    tree = ast.parse((REPO / script).read_text())
    return {a.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
            for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}


@functools.cache
def training_parser(script: str):
    """The HfArgumentParser the script builds (seqlm/training/arguments.py), which the launcher checks flags with."""
    from transformers import HfArgumentParser

    from seqlm.training.launch import script_arguments

    return HfArgumentParser(script_arguments(script))


def flags_of(script: str) -> set[str]:
    if script in TRAINING_SCRIPTS:
        return {s for a in training_parser(script)._actions for s in a.option_strings}
    return argparse_flags(script) | PENDING_FLAGS.get(script, set())


@functools.cache
def all_flags() -> set[str]:
    known = set(EXTERNAL_FLAGS)
    for batch_script in REPO.glob("*.slurm"):  # sbatch's and srun's options, as the Slurm scripts give them
        known |= set(FLAG.findall(batch_script.read_text()))
    for script in ARGPARSE_SCRIPTS + TRAINING_SCRIPTS + list(PENDING_FLAGS):
        if (REPO / script).exists() or script in PENDING_FILES:
            known |= flags_of(script) if (REPO / script).exists() else PENDING_FLAGS[script]
    return known


@functools.cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))


def exists(name: str) -> bool:
    return (REPO / name).exists() or name in PENDING_FILES


# -------------------------------------------------------------------------------------------------------- the tests

def test_the_documents_are_there():
    assert (REPO / "README.md").exists() and (REPO / "README_zh.md").exists()
    assert len(PAIRS) >= 10, [p.name for p, _ in PAIRS]
    for en, zh in PAIRS:
        assert zh.exists(), f"{en.relative_to(REPO)} has no Chinese version {zh.relative_to(REPO)}"


@pytest.mark.parametrize("en,zh", PAIRS, ids=[p.name for p, _ in PAIRS])
def test_each_pair_has_the_same_headings(en, zh):
    a = [level for level, _ in headings(en.read_text())]
    b = [level for level, _ in headings(zh.read_text())]
    assert a == b, (f"{en.name} and {zh.name} differ in their headings:\n"
                    f"{[h for h in headings(en.read_text())]}\n{[h for h in headings(zh.read_text())]}")


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_command_line_parses_and_its_flags_exist(doc):
    problems = []
    for line in command_lines(doc.read_text()):
        try:
            cmds = commands(line)
        except ValueError as e:
            problems.append(f"{line!r}: does not parse ({e})")
            continue
        for words in cmds:
            problems += check_command(words, line)
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


def check_command(words: list[str], line: str) -> list[str]:
    program, args = words[0], words[1:]
    if program == "make":
        return [f"{line!r}: no make target {t!r}" for t in args
                if "=" not in t and t not in make_targets() and t not in PENDING_TARGETS]
    if program not in ("python", "bash"):
        return []
    if program == "python" and args[:1] == ["-m"]:
        module = args[1]
        if module in EXTERNAL_MODULES:
            return []
        script = module.replace(".", "/") + ".py"
        args = args[2:]
    elif program == "python" and args and args[0].startswith("output/"):
        return []  # a tool inside a checkpoint (zero_to_fp32.py)
    elif args:
        script, args = args[0], args[1:]
    else:
        return [f"{line!r}: {program} with no script"]
    if not exists(script):
        return [f"{line!r}: {script} does not exist"]
    target = SHELL_TO_SCRIPT.get(script, script if script.endswith(".py") else None)
    if target is None:
        return [f"{line!r}: {script} takes no arguments here" for _ in args[:1]]
    if target not in ARGPARSE_SCRIPTS + TRAINING_SCRIPTS and target not in PENDING_FLAGS:
        return [f"{line!r}: {target} is not a script these tests know the flags of"]
    known = flags_of(target) if (REPO / target).exists() else PENDING_FLAGS[target]
    if "--help" in args or "-h" in args:
        return []
    problems = [f"{line!r}: {target} has no flag {f}" for f in args if f.startswith("--") and f.split("=")[0] not in known]
    if target in TRAINING_SCRIPTS and not problems:
        if args[:1] and args[0].endswith((".yaml", ".yml", ".json")):
            args = args[1:]  # a file of arguments, then flags: parse_args in seqlm/training/run.py reads it
        try:
            training_parser(target).parse_args(args)
        except SystemExit:
            problems.append(f"{line!r}: {target}'s parser refuses {args}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_flag_named_in_prose_exists(doc):
    text = doc.read_text()
    spans = [s for s in inline_spans(text) if not is_command(s)]
    _, blocks = split_fences(text)
    spans += [line for lang, block in blocks if lang == "text" for line in block]
    unknown = sorted({f for s in spans for f in FLAG.findall(s)} - all_flags())
    assert not unknown, f"{doc.name} names flags no script has: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_path_and_link_exists(doc):
    text = doc.read_text()
    _, blocks = split_fences(text)
    words = [w.rstrip(".,:;)") for s in inline_spans(text) for w in s.split()]
    words += [w for lang, block in blocks if lang != "python" for line in block for w in line.split()]
    missing = []
    for w in words:
        w = w.strip("\"'")
        if REPO_PATH.match(w):
            if not (list(REPO.glob(w)) if "*" in w else exists(w)):
                missing.append(w)
        elif TOP_LEVEL_FILE.match(w) and w not in EXTERNAL_FILES and not exists(w):
            missing.append(w)
    own = anchors(doc)
    for label, target in links(text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            missing.append(f"link {target}")
        elif anchor and anchor not in (own if not file else anchors(path)):
            missing.append(f"anchor {target}")
    assert not missing, f"{doc.name} names what does not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_measured_figures_stand_in_the_measurements(doc):
    """A measured figure is a link whose text is the figure, to the section of docs/benchmarks.md or
    docs/reliability.md that holds it; that section also states a date and a commit."""
    text = doc.read_text()
    problems = []
    for label, target in links(text):
        file, _, anchor = target.partition("#")
        if Path(file).name not in MEASUREMENTS:
            continue
        numbers = re.findall(r"\d+(?:[.,]\d+)*", label)
        if not numbers:
            continue
        if not anchor:
            problems.append(f"[{label}]({target}): a figure must link to the section that holds it")
            continue
        section = anchors((doc.parent / file).resolve()).get(anchor)
        if section is None:
            problems.append(f"[{label}]({target}): no such section")
            continue
        problems += [f"[{label}]({target}): {n} is not in that section" for n in numbers
                     if not re.search(rf"(?<![\d.,]){re.escape(n)}(?![\d]|[.,]\d)", section)]
        if not re.search(r"20\d\d-\d\d-\d\d", section) or not re.search(r"\b[0-9a-f]{7,40}\b", section):
            problems.append(f"[{label}]({target}): that section states no date or no commit")
    # Speed ratios (2.40×) are measurements: each one must be such a link.
    prose, _ = split_fences(text)
    unlinked = LINK.sub("", INLINE.sub("", "\n".join(prose)))
    problems += [f"{r}: a measured ratio without its link" for r in re.findall(r"\d+(?:\.\d+)?×", unlinked)]
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_no_document_quotes_a_file_the_repository_lacks(doc):
    assert "GUIDE" not in doc.read_text()


def test_pending_features_are_still_pending():
    """A parallel feature that has landed must leave the lists of excused names above."""
    landed = [f for f in PENDING_FILES if (REPO / f).exists()]
    landed += [t for t in PENDING_TARGETS if t in make_targets()]
    landed += [f"{s} {f}" for s, fs in PENDING_FLAGS.items() if (REPO / s).exists() and s not in PENDING_FILES
               for f in fs if f in argparse_flags(s)]
    assert not landed, f"these exist now: remove them from PENDING_* in tests/test_docs.py: {landed}"
