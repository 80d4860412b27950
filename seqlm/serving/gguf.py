"""A checkpoint as one GGUF file, what llama.cpp, ollama and LM Studio run, and an ollama Modelfile beside it.

The conversion is llama.cpp's own (`convert_hf_to_gguf.py` and its `gguf-py`), taken from the llama-cpp-python
source package that requirements-gguf.txt pins, so that the file matches the llama.cpp that the test loads it with.
`make gguf-setup` installs that package and unpacks the converter into the virtual environment (install_converter).

A fine-tuned checkpoint keeps its ChatML template and stop tokens in the GGUF's metadata; a pretrained one is exported
as a text model: without a template, since the one its tokenizer carries (Qwen3's) is not what it was trained on.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from seqlm import paths
from seqlm.data.conversation import END_OF_TEXT, IM_END, IM_START, chat_template, is_chat_model
from seqlm.fileio import atomic_output, check_disk_space
from seqlm.model_folder import check_model_folder

REQUIREMENTS = paths.REPO / "requirements-gguf.txt"
# What the converter's conversion is made of, in the source package's vendor/llama.cpp/
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
# Bytes per weight of the types llama.cpp's converter writes itself; the k-quants (Q4_K_M, Q5_K_M, ...) need llama.cpp's
# llama-quantize tool, run on the f16 file.
OUTTYPES = {"f16": 2, "bf16": 2, "f32": 4, "q8_0": 34 / 32}  # q8_0: blocks of 32 int8 and one f16 scale
VOCABULARY_BYTES = 64 << 20  # the token list, merges and template written beside the weights, with room to spare
MODELFILE = "Modelfile"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

# ollama's templates are Go templates: this is CHATML_TEMPLATE's conversation, the system prompt in .System (a
# conversation's own system message, else the Modelfile's SYSTEM).
OLLAMA_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""
OLLAMA_TEXT = "{{ .Prompt }}"
# A conversation that shows how a template writes each role, turn ends and the generation prompt.
PROBE = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]


class ExportError(ValueError):
    """An export that cannot be done; the message is one line saying why and what to do."""


def gguf_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def default_output_dir(model_path: str | os.PathLike) -> Path:
    """output/sft -> output/sft-gguf"""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.name}-gguf")


def pinned_version() -> str:
    """The llama-cpp-python version requirements-gguf.txt pins: that of the converter too."""
    match = re.search(r"^llama-cpp-python==(\S+)", REQUIREMENTS.read_text(), re.MULTILINE)
    if match is None:
        raise ExportError(f"{REQUIREMENTS} pins no llama-cpp-python==VERSION")
    return match[1]


def converter_dir() -> Path:
    """Where install_converter unpacks it: in the virtual environment, which holds the rest of what it needs."""
    return Path(sys.prefix) / "share" / f"llama.cpp-converter-{pinned_version()}"


def install_converter() -> Path:
    """Download the pinned llama-cpp-python source package (pip's cache has it once pip has built the package) and
    unpack the converter from it."""
    version, target = pinned_version(), converter_dir()
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "--dest", download], check=True)
        sdist, = Path(download).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar, atomic_output(target) as partial:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].split("/")[0] in CONVERTER_PARTS]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(partial, members=members, filter="data")
            missing = [part for part in CONVERTER_PARTS if not (partial / part).exists()]
            if missing:
                raise ExportError(f"{sdist.name} has no vendor/llama.cpp/{missing[0]}: not the expected converter")
    return target


def find_converter() -> Path:
    """The converter script; ExportError naming `make gguf-setup` if it, or a module it needs, is missing."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ExportError(f"llama.cpp's converter is not installed ({script} is missing): run `make gguf-setup`")
    if importlib.util.find_spec("sentencepiece") is None:  # the converter tries it first for every Qwen2 tokenizer
        raise ExportError("the converter needs the sentencepiece package: run `make gguf-setup`")
    return script


def known_architectures(script: Path) -> set[str]:
    """The architectures the converter converts, read from its table (conversion/__init__.py's TEXT_MODEL_MAP)
    without importing it: that imports torch and takes seconds."""
    tree = ast.parse((script.parent / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    raise ExportError(f"{script.parent}/conversion/__init__.py has no TEXT_MODEL_MAP: reinstall with `make gguf-setup`")


def parameter_count(folder: Path) -> int:
    """The number of weights, from the safetensors headers (no tensor is read); for .bin files, at most half their
    size (16-bit or wider weights)."""
    count = 0
    for path in folder.glob("*.safetensors"):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except ValueError:  # JSON, or UTF-8, that does not decode
            raise ExportError(f"{path}: not a safetensors file (its header does not read)") from None
        count += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return count or sum(p.stat().st_size for p in folder.glob("*.bin")) // 2


@dataclass
class Export:
    """What an export will write, settled by plan_export before any heavy work."""

    model_path: Path
    outtype: str
    output_dir: Path
    converter: Path
    system_prompt: str | None  # the fine-tuned model's default system prompt, for the Modelfile
    chat: bool

    @property
    def gguf(self) -> Path:
        return self.output_dir / gguf_name(self.outtype)

    def modelfile(self) -> str:
        """The ollama Modelfile: the GGUF beside it, the template and where generation stops."""
        lines = [f"FROM ./{self.gguf.name}", ""]
        if self.chat:
            lines += [f'TEMPLATE """{OLLAMA_CHATML}"""']
            if self.system_prompt:
                lines += [f'SYSTEM """{self.system_prompt}"""']
            lines += [f'PARAMETER stop "{IM_END}"']
        else:
            lines += [f'TEMPLATE """{OLLAMA_TEXT}"""']
        lines += [f'PARAMETER stop "{END_OF_TEXT}"']
        return "\n".join(lines) + "\n"


def chatml_system_prompt(tokenizer, model_path: Path) -> str | None:
    """The default system prompt of a ChatML template (None if it has none); ExportError if the template is not ChatML,
    the one format the Modelfile writes."""
    rendered = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    system_turn = f"{IM_START}system\n"
    system = rendered[len(system_turn):rendered.index(IM_END)] if rendered.startswith(system_turn) else None
    if rendered != tokenizer.apply_chat_template(PROBE, chat_template=chat_template(system), tokenize=False,
                                                 add_generation_prompt=True):
        raise ExportError(f"{model_path}: its chat template is not ChatML, the format the ollama Modelfile is written "
                          "for; fine-tune it with finetune.py")
    return system


def plan_export(model_path: str | os.PathLike, outtype: str = "f16",
                output_dir: str | os.PathLike | None = None) -> Export:
    """Check everything an export needs, reading only small files; ExportError (or ModelFolderError) in one line."""
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype}: llama.cpp's converter writes {', '.join(OUTTYPES)}; other types "
                          "(Q4_K_M, ...) come from llama.cpp's llama-quantize run on the f16 file")
    if not Path(model_path).is_dir():
        raise ExportError(f"no model folder {model_path}: export a local checkpoint (output/sft, output/pretrain)")
    check_model_folder(str(model_path))
    model_path = Path(model_path)
    converter = find_converter()
    architecture = (json.loads((model_path / "config.json").read_text()).get("architectures") or ["(none)"])[0]
    if architecture not in known_architectures(converter):
        raise ExportError(f"{model_path} holds {architecture}, which llama.cpp's converter (llama-cpp-python "
                          f"{pinned_version()}) cannot convert: only the architectures it lists "
                          "(convert_hf_to_gguf.py --print-supported-models)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    chat = is_chat_model(tokenizer)
    system_prompt = chatml_system_prompt(tokenizer, model_path) if chat else None
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(model_path)
    needed = parameter_count(model_path) * OUTTYPES[outtype] + VOCABULARY_BYTES
    check_disk_space(output_dir, int(needed), f"the {outtype} GGUF of {model_path}")
    return Export(model_path, outtype, output_dir, converter, system_prompt, chat)


def staged_model(export: Export, folder: Path) -> Path:
    """The model folder as the converter is to read it, built in `folder` from links to its files: a text model's
    tokenizer loses its chat template (the converter copies any it finds into the GGUF)."""
    staged = folder / export.model_path.name
    staged.mkdir()
    for source in export.model_path.iterdir():
        if not source.is_file() or (not export.chat and source.name in CHAT_TEMPLATE_FILES):
            continue
        if not export.chat and source.name == TOKENIZER_CONFIG:
            config = json.loads(source.read_text(encoding="utf-8"))
            config.pop("chat_template", None)
            (staged / source.name).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        else:
            (staged / source.name).symlink_to(source.resolve())
    return staged


def run_export(export: Export) -> float:
    """Convert; the GGUF appears under its name only once complete, then the Modelfile. Returns the seconds taken."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as staging, atomic_output(export.gguf) as partial:
        command = [sys.executable, str(export.converter), str(staged_model(export, Path(staging))),
                   "--outfile", str(partial), "--outtype", export.outtype, "--model-name", export.model_path.name]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not partial.is_file():
            log = (result.stdout + result.stderr).strip().splitlines() or ["(no output)"]
            sys.stderr.write("\n".join(log[-20:]) + "\n")
            raise ExportError(f"llama.cpp's converter failed on {export.model_path} (exit {result.returncode}): "
                              f"{log[-1]}")
    with atomic_output(export.output_dir / MODELFILE) as partial:
        partial.write_text(export.modelfile(), encoding="utf-8")
    return time.perf_counter() - start
