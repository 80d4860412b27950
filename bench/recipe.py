"""What each fix of the tutorial is worth in learning, at small scale: the same small model, data and number of training
tokens for our defaults (two seeds: their spread is the noise) and for each of the tutorial's choices, scored by the
held-out bits per character of pretraining; then fine-tuning with our loss mask against the tutorial's labels (masked
with the pad id), scored by the loss on the answers of held-out conversations.

    python -m bench.recipe                    # 6 pretraining, 3 fine-tuning runs on CPU ranks: 57 min, 2 shared cores
    OMP_THREAD_LIMIT=1 python -m bench.recipe # one thread a run, where other work shares the cores (docs/benchmarks.md)
    python -m bench.recipe --smoke            # a few steps each (tests/test_bench.py runs this)

The variants, each what the tutorial's code does (its pretrain.py, finetune.py and ds_config_zero2.json):
- tutorial schedule: its ds config's `WarmupLR` block (DeepSpeed's log warm-up, then a constant rate), added to ours
  and given through DS_CONFIG;
- no separator: each document tokenized alone (`tokenizer(texts)`) and the ids chained, nothing between documents;
- tutorial grouping: `group_texts` over `.map(batched=True, batch_size=40000, num_proc=10)` (its pretrain.sh's
  --preprocessing_num_workers 10): each of the ten shards drops the tail of each of its map batches;
- all of the tutorial's: the three together;
- SFT, tutorial labels: its preprocess(): labels of the system and user turns and of each turn's header are the pad
  id (<|endoftext|>), not -100, while every <|im_start|>, <|im_end|> and the newline after it are trained; every
  conversation padded to --max_length with input and label the pad id (attention mask 0 there).
Everything else is ours in every run. Every run is the command pretrain.sh / finetune.sh runs (the launcher on
pretrain.py or finetune.py, with the flags they make of PRESET, TRAIN_FILE, ...); the data variants run the same
main() through the same launcher, with the training blocks or labels swapped in by this file (it is also their rank
script: HOOK). Evaluation is never swapped.

--out receives results.md and results.json, rewritten after every run (a bench stopped by a time limit keeps what it
finished), and runs.log (every run's output); runs write under --workdir.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.train import save
from seqlm.data.demo import copy_offline_tokenizer, demo_documents, free_port, write_demo_conversations
from seqlm.data.sft_cache import IGNORE_INDEX, ConversationDataset
from seqlm.data.subset import make_subset
from seqlm.evaluation.provenance import provenance
from seqlm.paths import REPO
from seqlm.training.sft import PadToLongest

# The ranks of a variant find here what to swap in: "blocks=PATH" (pretraining blocks, an .npy of token ids) or
# "sft_labels=tutorial".
HOOK = "SEQLM_RECIPE_HOOK"
TUTORIAL_WORKERS = 10  # --preprocessing_num_workers in the tutorial's pretrain.sh: datasets' map cuts ten shards
SEEDS = (42, 43)
TRAIN_DOCS, HELDOUT_DOCS = 1700, 100  # of the 1,848 People's Daily documents, as demo.sh splits them
TRAIN_CONVERSATIONS, HELDOUT_CONVERSATIONS = 4000, 200
NARROW = "hidden_size=32,intermediate_size=128"  # the tiny preset at a quarter of its width (tests/helpers.py)
# The tutorial's scheduler block, as its ds_config_zero2.json has it; the Trainer fills the "auto" values with 0, the
# learning rate and the warm-up steps.
WARMUP_LR = {"type": "WarmupLR",
             "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}}


@dataclass
class Budget:
    steps: int  # pretraining optimizer steps, each micro_batch x block_size tokens
    sft_steps: int
    max_eval_samples: int | None  # held-out blocks scored (None: all)
    max_eval_conversations: int
    block_size: int = 256
    micro_batch: int = 8
    max_length: int = 256  # SFT: conversations are cut, and the tutorial's padded, to this many tokens

    @property
    def tokens(self) -> int:
        return self.steps * self.micro_batch * self.block_size


FULL = Budget(steps=100, sft_steps=50, max_eval_samples=None, max_eval_conversations=HELDOUT_CONVERSATIONS)
SMOKE = Budget(steps=3, sft_steps=2, max_eval_samples=4, max_eval_conversations=8)


@dataclass
class Variant:
    name: str
    seed: int = SEEDS[0]
    schedule: str = "ours"  # or "tutorial": the WarmupLR block in the ds config
    separator: bool = True
    grouping: str = "ours"  # or "tutorial"
    sft_labels: str | None = None  # fine-tuning runs: "ours" or "tutorial"

    @property
    def swaps_blocks(self) -> bool:
        return not self.separator or self.grouping == "tutorial"

    @property
    def ours(self) -> bool:
        return self.schedule == "ours" and not self.swaps_blocks and self.sft_labels != "tutorial"


VARIANTS = [
    Variant(f"defaults (seed {SEEDS[0]})"),
    Variant(f"defaults (seed {SEEDS[1]})", seed=SEEDS[1]),
    Variant("tutorial schedule", schedule="tutorial"),
    Variant("no separator", separator=False),
    Variant("tutorial grouping", grouping="tutorial"),
    Variant("all of the tutorial's", schedule="tutorial", separator=False, grouping="tutorial"),
    Variant(f"SFT: our loss mask (seed {SEEDS[0]})", sft_labels="ours"),
    Variant(f"SFT: our loss mask (seed {SEEDS[1]})", seed=SEEDS[1], sft_labels="ours"),
    Variant("SFT: tutorial labels", sft_labels="tutorial"),
]


# ---------------------------------------------------------------- the ranks of a variant (HOOK set)

class Blocks(torch.utils.data.Dataset):
    """Training blocks made by the bench, read as pretrain.py's BlockDataset reads its own."""

    def __init__(self, path: str):
        self.blocks = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


class TutorialLabels(ConversationDataset):
    """The training conversations labelled and padded as the tutorial's preprocess() does (module docstring). Built
    from our cache, so ids, truncation and order (the length-grouped sampler reads `lengths`) are those of our run."""

    def __init__(self, folders: list[Path], max_length: int, tokenizer):
        super().__init__(folders, max_length)
        self.max_length, self.pad = max_length, tokenizer.pad_token_id
        self.im_start, self.im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        ids, ours = item["input_ids"], item["labels"]
        after_end = torch.zeros_like(ids, dtype=torch.bool)
        after_end[1:] = ids[:-1] == self.im_end  # the newline that closes every turn
        trained = (ours != IGNORE_INDEX) | (ids == self.im_start) | (ids == self.im_end) | after_end
        padding = (0, self.max_length - len(ids))
        return {"input_ids": F.pad(ids, padding, value=self.pad),
                "labels": F.pad(torch.where(trained, ids, self.pad), padding, value=self.pad),
                "attention_mask": F.pad(torch.ones_like(ids), padding, value=0)}


class TutorialCollator(PadToLongest):
    """Training batches come padded already (TutorialLabels); held-out ones are ours, scored with our mask."""

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if "attention_mask" in features[0]:
            return {key: torch.stack([f[key] for f in features]) for key in features[0]}
        return super().__call__(features)


def rank_main() -> None:
    """pretrain.py's or finetune.py's main(), its training data swapped for the variant's (HOOK)."""
    kind, _, value = os.environ[HOOK].partition("=")
    if kind == "blocks":
        import pretrain

        product_blocks = pretrain.blocks

        def blocks(files, tokenizer, separator_id, vocab_size, data_args):
            if files is not data_args.train_files:
                return product_blocks(files, tokenizer, separator_id, vocab_size, data_args)
            return Blocks(value)

        pretrain.blocks = blocks
        pretrain.main()
    else:
        import finetune

        product_conversations = finetune.conversations

        def conversations(files, tokenizer, data_args):
            dataset = product_conversations(files, tokenizer, data_args)
            if files is not data_args.train_files:
                return dataset
            return TutorialLabels(dataset.folders, data_args.max_length, tokenizer)

        finetune.conversations = conversations
        finetune.PadToLongest = TutorialCollator
        finetune.main()


# ---------------------------------------------------------------- the bench

def prepare_data(workdir: Path) -> dict[str, Path]:
    data = {"tokenizer": workdir / "tokenizer", "train": workdir / "train.jsonl", "val": workdir / "val.jsonl",
            "sft_train": workdir / "sft_train.jsonl", "sft_val": workdir / "sft_val.jsonl",
            "cache": workdir / "token_cache"}
    if not data["tokenizer"].is_dir():
        copy_offline_tokenizer(data["tokenizer"])
    if not data["train"].is_file():
        corpus, conversations = workdir / "corpus.jsonl", workdir / "conversations.jsonl"
        docs = list(demo_documents())
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
        make_subset(corpus, data["train"], TRAIN_DOCS, data["val"], HELDOUT_DOCS)
        write_demo_conversations(conversations)
        from seqlm.data.conversation import parse_conversation
        make_subset(conversations, data["sft_train"], TRAIN_CONVERSATIONS, data["sft_val"], HELDOUT_CONVERSATIONS,
                    parse=parse_conversation)
    return data


def training_blocks(variant: Variant, data: dict[str, Path], block_size: int, workdir: Path) -> Path:
    """The variant's training blocks as token ids, (blocks, block_size) in an .npy file: the documents tokenized as the
    tutorial does, our separator after each or not, then cut into consecutive blocks (ours: only the last partial
    one dropped) or grouped as the tutorial groups them."""
    import datasets
    from transformers import AutoTokenizer

    from bench.data import GROUP_TEXTS_BATCH, group_texts
    from seqlm.data.corpus import iter_texts

    path = workdir / f"blocks-separator-{variant.separator}-grouping-{variant.grouping}-{block_size}.npy"
    if path.is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(str(data["tokenizer"]))
    docs = tokenizer(list(iter_texts(data["train"])))["input_ids"]
    if variant.separator:
        separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        docs = [ids + [separator] for ids in docs]
    if variant.grouping == "tutorial":
        grouped = datasets.Dataset.from_dict({"input_ids": docs}).map(
            group_texts, batched=True, batch_size=GROUP_TEXTS_BATCH, num_proc=TUTORIAL_WORKERS,
            fn_kwargs=dict(block_size=block_size))
        blocks = np.array(grouped["input_ids"], dtype=np.uint32)
    else:
        stream = np.fromiter((t for ids in docs for t in ids), dtype=np.uint32)
        blocks = stream[:len(stream) // block_size * block_size].reshape(-1, block_size)
    np.save(path, blocks)
    return path


def ds_config(schedule: str, workdir: Path) -> Path:
    if schedule == "ours":
        return REPO / "ds_config_zero2.json"
    path = workdir / "ds_config_zero2_warmuplr.json"
    path.write_text(json.dumps({**json.loads((REPO / "ds_config_zero2.json").read_text()), "scheduler": WARMUP_LR},
                               indent=2))
    return path


def launch(script: str, env: dict[str, str], flags: list[str], log: Path) -> int:
    """The command pretrain.sh / finetune.sh would run with `env` (their variables as the flags they become), with
    `script` as the ranks' script; its output added to `log`."""
    as_flags = {"DS_CONFIG": "--deepspeed", "PRESET": "--config_name", "TOKENIZER": "--tokenizer_name",
                "MODEL": "--model_name_or_path", "TRAIN_FILE": "--train_files", "VALIDATION_FILE": "--validation_files",
                "OUTPUT_DIR": "--output_dir"}
    script_flags = [part for var, flag in as_flags.items() if var in env for part in (flag, env[var])]
    if "MODEL" in env:
        script_flags += ["--eval_strategy", "steps"]  # finetune.sh's, with VALIDATION_FILE
    command = [sys.executable, "-m", "seqlm.training.launch", script, *script_flags, *flags]
    with open(log, "a") as f:
        f.write(f"\n===== {' '.join(command)}\n")
        f.flush()
        return subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def tenths(steps: int) -> list[str]:
    """Warm-up over a tenth of the steps, and a log line every tenth: the last one names the final learning rate."""
    tenth = str(max(1, steps // 10))
    return ["--warmup_steps", tenth, "--logging_steps", tenth]


def run_dir(variant: Variant, workdir: Path) -> Path:
    return workdir / "runs" / "".join(c if c.isalnum() else "_" for c in variant.name)


def run(variant: Variant, data: dict[str, Path], budget: Budget, args) -> dict:
    out = run_dir(variant, args.workdir)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "NUM_GPUS": "1", "MASTER_PORT": str(free_port()), "SWANLAB_MODE": "disabled",
           "OUTPUT_DIR": str(out)}
    env.pop("OMP_NUM_THREADS", None)  # the launcher shares the cores out among the ranks
    common = ["--seed", str(variant.seed), "--per_device_train_batch_size", str(budget.micro_batch),
              "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3", "--activation_checkpointing", "false",
              "--token_cache_dir", str(data["cache"]), "--report_to", "none", "--save_strategy", "no",
              "--sample_steps", "0", "--disable_tqdm", "true"]
    if variant.sft_labels is None:
        env.update(PRESET="tiny", TOKENIZER=str(data["tokenizer"]), TRAIN_FILE=str(data["train"]),
                   VALIDATION_FILE=str(data["val"]), DS_CONFIG=str(ds_config(variant.schedule, args.workdir)))
        flags = [*common, "--config_overrides", NARROW, "--block_size", str(budget.block_size),
                 "--max_steps", str(budget.steps), *tenths(budget.steps),
                 "--eval_strategy", "no", "--do_eval", "true",
                 *(["--max_eval_samples", str(budget.max_eval_samples)] if budget.max_eval_samples else [])]
        script = "pretrain.py"
        if variant.swaps_blocks:
            env[HOOK] = f"blocks={training_blocks(variant, data, budget.block_size, args.workdir)}"
            script = "bench/recipe.py"
    else:
        env.update(MODEL=str(run_dir(VARIANTS[0], args.workdir)),
                   TRAIN_FILE=str(data["sft_train"]), VALIDATION_FILE=str(data["sft_val"]),
                   DS_CONFIG=str(REPO / "ds_config_zero2.json"))
        # --max_length in a file of arguments: launch.py checks the flags of any script but finetune.py as
        # pretrain.py's, and this one is pretrain.py's only
        sft_args = args.workdir / f"sft-{budget.max_length}.yaml"
        sft_args.write_text(f"max_length: {budget.max_length}\n")
        flags = [str(sft_args), *common, "--max_steps", str(budget.sft_steps), *tenths(budget.sft_steps),
                 "--eval_steps", str(budget.sft_steps),
                 "--max_eval_samples", str(budget.max_eval_conversations)]
        script = "finetune.py"
        if variant.sft_labels == "tutorial":
            env[HOOK] = "sft_labels=tutorial"
            script = "bench/recipe.py"
    start = time.perf_counter()
    code = launch(script, env, flags, args.out / "runs.log")
    if code != 0:
        return dict(error=f"exit code {code} (runs.log)")
    results = json.loads((out / "eval_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    rates = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    return dict(seconds=round(time.perf_counter() - start), tokens=state["num_input_tokens_seen"],
                eval_loss=results["eval_loss"], bits_per_char=results.get("eval_bits_per_char"),
                last_learning_rate=rates[-1])  # shows the schedule: ours decays to 0, WarmupLR stays at the peak


def verdict(difference: float, noise: float) -> str:
    if abs(difference) <= noise:
        return "within the noise"
    return "worse" if difference > 0 else "better"


def table(results: list[tuple[Variant, dict]]) -> str:
    """Markdown: each run's score, and its difference from the mean of our two seeds, against their spread."""
    def mean_and_spread(key: str, sft: bool) -> tuple[float, float] | None:
        scores = [r[key] for v, r in results if v.ours and (v.sft_labels is not None) == sft and "error" not in r]
        return (sum(scores) / 2, abs(scores[0] - scores[1])) if len(scores) == 2 else None

    rows = ["| run | score | vs ours (mean of 2 seeds) | seed spread | verdict | tokens | last logged LR | seconds |",
            "|---|---:|---:|---:|---|---:|---:|---:|"]
    for variant, r in results:
        sft = variant.sft_labels is not None
        key = "eval_loss" if sft else "bits_per_char"
        if "error" in r:
            rows.append(f"| {variant.name} | {r['error']} | | | | | | |")
            continue
        unit = "nats/answer token" if sft else "bits/char"
        reference = mean_and_spread(key, sft)
        difference = spread = judged = ""
        if reference:
            mean, noise = reference
            difference, spread = f"{r[key] - mean:+.4f}", f"{noise:.4f}"
            judged = "" if variant.ours else verdict(r[key] - mean, noise)
        rows.append(f"| {variant.name} | {r[key]:.4f} {unit} | {difference} | {spread} | {judged} | "
                    f"{r['tokens']:,} | {r['last_learning_rate']:.2e} | {r['seconds']} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help=f"{SMOKE.steps} pretraining and {SMOKE.sft_steps} fine-tuning "
                   "steps a run, a few held-out blocks: minutes on CPU")
    p.add_argument("--out", type=Path, default=REPO / "output" / "bench-recipe", help="results and runs.log")
    p.add_argument("--workdir", type=Path, default=REPO / "output" / "bench-recipe-work")
    p.add_argument("--variants", help="comma-separated names to run (default: all); the first always runs, "
                                      "fine-tuning starts from it")
    args = p.parse_args()
    budget = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for name in ("runs.log", "results.md", "results.json"):
        (args.out / name).unlink(missing_ok=True)
    data = prepare_data(args.workdir)
    header = (f"{provenance()}\ntiny preset at {NARROW}, block {budget.block_size}, {budget.micro_batch} sequences a "
              f"step, learning rate 3e-3, pretraining {budget.steps} steps ({budget.tokens:,} tokens) on "
              f"{TRAIN_DOCS:,} People's Daily documents, scored on {HELDOUT_DOCS} held out; fine-tuning "
              f"{budget.sft_steps} steps of {budget.micro_batch} conversations (max_length {budget.max_length}) from "
              f"the first run, scored on {budget.max_eval_conversations} held out")
    wanted = set(args.variants.split(",")) if args.variants else None
    results = []
    for i, variant in enumerate(VARIANTS):
        if i and wanted is not None and variant.name not in wanted:
            continue
        result = run(variant, data, budget, args)
        print(f"{variant.name}: {result.get('error') or result}", file=sys.stderr, flush=True)
        results.append((variant, result))
        save(results, header, table(results), args.out)
        if "error" in result and i == 0:
            break
    print(save(results, header, table(results), args.out))
    return 1 if any("error" in r for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(rank_main() if HOOK in os.environ else main())
