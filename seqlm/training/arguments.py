"""Command-line arguments, in the shape of transformers' run_clm.py: model, data and training dataclasses parsed
together by HfArgumentParser, so every TrainingArguments flag works unchanged. Each default lives here once."""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from seqlm import paths


@dataclass
class AttentionArguments:
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "sdpa, flash_attention_2 or eager (default: flash_attention_2 where it is installed and runs: "
                          "GPUs of compute capability 8.0 or more; else sdpa)."})


@dataclass
class ModelArguments(AttentionArguments):
    config_name: str = field(
        default="qwen2.5-0.5b",
        metadata={"help": "Model architecture to train from scratch: a preset in configs/ (qwen2.5-0.5b, tiny), a "
                          "config.json, or a model folder / hub id whose config is used with random weights."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Change numbers of --config_name's config, e.g. hidden_size=512,num_hidden_layers=8: a "
                          "narrower or shallower model of the same architecture (run_clm.py's flag)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Continue pretraining from these weights (an HF checkpoint folder or hub id) instead of "
                          "starting from random weights."})
    tokenizer_name: str = field(
        default=str(paths.MODEL_DIR),
        metadata={"help": "Tokenizer folder or hub id (default: the one download_dataset.py fetches)."})


@dataclass
class DataTrainingArguments:
    train_files: list[str] = field(
        default_factory=lambda: [str(paths.TRAIN_SUBSET)],
        metadata={"help": "Training corpus: JSON Lines files of {\"text\": ...} (make_subset.py writes one)."})
    validation_files: list[str] = field(
        default_factory=lambda: [str(paths.VALIDATION_SUBSET)],
        metadata={"help": "Held-out JSON Lines files for the evaluation loss and perplexity."})
    block_size: int = field(
        default=2048, metadata={"help": "Tokens per training sequence; documents are packed across blocks."})
    token_cache_dir: str = field(
        default=str(paths.TOKEN_CACHE_DIR),
        metadata={"help": "Where tokenized corpora are kept and reused (keyed by corpus, tokenizer and settings)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N validation blocks only (default: all); bits per "
                                        "character/byte count the text of exactly those blocks."})


@dataclass
class SampleArguments:
    """Continuations of fixed prompts during training, so a run shows what the model writes, not only its loss."""

    sample_steps: int | None = field(
        default=None, metadata={"help": "Write samples every N steps, at the start and at the end (default: every "
                                        "--eval_steps; 0 turns samples off)."})
    sample_prompts_file: str | None = field(
        default=None, metadata={"help": "Prompts to continue, one per line (default: prompts/zh.txt)."})
    sample_max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per prompt and sample."})
    sample_seed: int = field(
        default=0, metadata={"help": "Seed of the sampled continuations: the same at every step, so they compare."})


@dataclass
class BenchmarkArguments:
    """Standard benchmarks (seqlm/evaluation/benchmarks.py, scored by lm-evaluation-harness) on the model being trained."""

    benchmark_suite: str | None = field(
        default=None, metadata={"help": "Score this suite at the last step: local, cloze, default, or benchmark names, "
                                        "comma-separated (python benchmark.py --help). Default: none."})
    benchmark_steps: int = field(default=0, metadata={"help": "Also every N steps (0: only at the last step)."})
    benchmark_limit: int | None = field(
        default=None, metadata={"help": "Score at most the first N documents of each task (default: all)."})
    benchmark_batch_size: int = field(default=8, metadata={"help": "Requests per forward pass."})
    benchmark_data_dir: str = field(
        default=str(paths.EVAL_DATA_DIR), metadata={"help": "Task data (download_dataset.py --eval puts them here)."})
    benchmark_heldout_file: str | None = field(
        default=None, metadata={"help": "JSON Lines of {\"text\": ...} for heldout_bpb (pretraining: default the "
                                        "first --validation_files)."})


BATCH_SHAPE = ("per_device_train_batch_size", "gradient_accumulation_steps")  # "auto" or a number, each


@dataclass
class PretrainingArguments(TrainingArguments):
    """TrainingArguments with the defaults of this pipeline: the tutorial's, with its bugs fixed."""

    output_dir: str = field(default=str(paths.PRETRAIN_OUTPUT), metadata={"help": "Checkpoints and the final model."})
    per_device_train_batch_size: str = field(  # str: "auto" or a number
        default="auto", metadata={
            "help": "Sequences per device and micro-step. auto: the largest that the memory planner fits into the GPU "
                    "(seqlm/training/fit.py states the margin) and that divides the global batch; 4 on a CPU."})
    gradient_accumulation_steps: str = field(  # str: "auto" or a number
        default="auto", metadata={
            "help": "Micro-steps per optimizer step. auto: the global batch over micro-batch x ranks (16 with a given "
                    "micro-batch and no --global_batch_size). A number needs a number for the micro-batch too."})
    global_batch_size: int | None = field(
        default=None, metadata={
            "help": "Sequences per optimizer step, all ranks together (micro-batch x accumulation x ranks): kept "
                    "exactly, whatever the GPU. Default: 64 with --per_device_train_batch_size auto, else the given "
                    "micro-batch x --gradient_accumulation_steps x ranks."})
    # None: chosen from the GPU by seqlm.training.fit.fit_to_device; a bare --bf16 / --fp16 still means true.
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision. Default: on GPUs of compute capability 8.0 or more.",
                                "nargs": "?", "const": True})
    fp16: bool | None = field(
        default=None, metadata={"help": "fp16 mixed precision with dynamic loss scaling. Default: on GPUs without "
                                        "bf16 (T4, V100, P100, RTX 20xx).", "nargs": "?", "const": True})
    use_liger_kernel: bool | None = field(
        default=None, metadata={"help": "Liger's Triton kernels (pip install liger-kernel; CUDA GPUs); its fused "
                                        "loss never materialises the logits. Default: on only when the run needs it "
                                        "to fit the GPU.", "nargs": "?", "const": True})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Sequences per device in evaluation."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training subset."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate, after warm-up."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Decay after warm-up (the tutorial's DeepSpeed WarmupLR never decays)."})
    warmup_steps: float = field(default=200, metadata={"help": "Linear warm-up steps (a float < 1 is a ratio)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    activation_checkpointing: str = field(  # str: the parser would read `bool | str` as a bool
        default="auto", metadata={
            "help": "Recompute activations in the backward pass: much less memory, about a third more compute. auto: "
                    "off on a GPU where the memory planner finds the run fits without it, else on; true; false. The "
                    "tutorial's --gradient_checkpointing still works."})
    logging_steps: float = field(default=10, metadata={"help": "Log loss, learning rate and throughput every N steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: steps, epoch or no."})
    eval_steps: float | None = field(default=200, metadata={"help": "Evaluate every N steps."})
    save_steps: float = field(default=200, metadata={"help": "Save a checkpoint every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most this many checkpoints."})
    include_num_input_tokens_seen: str | bool = field(
        default=True, metadata={"help": "Count the tokens seen (logged as num_input_tokens_seen)."})
    report_to: None | str | list[str] = field(
        default="swanlab", metadata={"help": "Loggers: swanlab (mode from SWANLAB_MODE), tensorboard, none, ..."})
    seed: int = field(default=42, metadata={"help": "Seed of the weights' initialisation and the data order."})
    do_train: bool = field(default=True, metadata={"help": "Train (pass --do_train false to only evaluate)."})
    nan_policy: str = field(
        default="stop", metadata={"help": "At a non-finite loss: stop (before anything is saved), or skip the batch "
                                          "(its gradients are 0; counted in the logs as nan_batches_skipped).",
                                  "choices": ["stop", "skip"]})
    max_nan_skips: int = field(
        default=10, metadata={"help": "With --nan_policy skip: stop after more than this many non-finite losses in "
                                      "a row."})
    peak_tflops: float | None = field(
        default=None, metadata={"help": "Dense 16-bit peak of one device in TFLOP/s, for the logged MFU (default: known "
                                        "for H100/H200/A100/L40S/RTX 5090/4090/3090/2080 Ti/V100/T4/P100 and others)."})

    def __post_init__(self):
        # The deprecated alias still wins when given, as in TrainingArguments; here the new name has a default.
        if self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        value = str(self.activation_checkpointing).lower()
        if value not in ("auto", "true", "false", "yes", "no", "1", "0"):
            raise ValueError(f"--activation_checkpointing {self.activation_checkpointing}: use auto, true or false")
        # "auto" stays "auto" until the script decides it for this machine (seqlm.training.fit.fit_to_device)
        self.activation_checkpointing = "auto" if value == "auto" else value in ("true", "yes", "1")
        micro_batch, accumulation = (str(getattr(self, name)).lower() for name in BATCH_SHAPE)
        for name, value in zip(BATCH_SHAPE, (micro_batch, accumulation)):
            if value != "auto" and not (value.isdigit() and int(value) > 0):
                raise ValueError(f"--{name} {getattr(self, name)}: use auto or a positive number")
        if micro_batch == "auto" and accumulation != "auto":
            raise ValueError(f"--gradient_accumulation_steps {accumulation} with --per_device_train_batch_size auto: "
                             "the accumulation follows from the micro-batch the GPU fits; give the sequences per "
                             "optimizer step as --global_batch_size instead, or a number for the micro-batch")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"--global_batch_size {self.global_batch_size}: use a positive number of sequences")
        # TrainingArguments computes with numbers; "auto" is restored after it, until fit_to_device decides.
        for name, value in zip(BATCH_SHAPE, (micro_batch, accumulation)):
            setattr(self, name, 1 if value == "auto" else int(value))
        super().__post_init__()
        for name, value in zip(BATCH_SHAPE, (micro_batch, accumulation)):
            if value == "auto":
                setattr(self, name, "auto")


# ---------------------------------------------------------------- fine-tuning (finetune.py)


@dataclass
class FinetuningModelArguments(AttentionArguments):
    model_name_or_path: str = field(
        default=str(paths.PRETRAIN_OUTPUT),
        metadata={"help": "The model to fine-tune: an HF checkpoint folder (default: what pretrain.sh wrote) or a "
                          "hub id."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or hub id (default: the model's own)."})


@dataclass
class SFTDataArguments:
    train_files: list[str] = field(
        default_factory=lambda: [str(paths.SFT_SUBSET)],
        metadata={"help": "Conversations, JSON Lines: {\"conversations\": [{\"from\": \"human\"|\"assistant\", "
                          "\"value\": ...}]} (BELLE) or {\"messages\": [{\"role\": ..., \"content\": ...}]}. "
                          "Default: the subset `python make_subset.py --schema sft` cuts of BELLE."})
    validation_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Held-out conversations: evaluated at the end, and every --eval_steps with "
                          "--eval_strategy steps."})
    max_length: int = field(
        default=2048, metadata={"help": "Cut conversations to this many tokens (batches are padded only to their "
                                        "longest); one left with nothing to learn is skipped and counted."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System turn for conversations without one; saved in the chat template, so "
                                        "chat.py uses it too (default: none)."})
    token_cache_dir: str = field(
        default=str(paths.TOKEN_CACHE_DIR),
        metadata={"help": "Where tokenized conversations are kept and reused (keyed by file, tokenizer and format)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many validation conversations (default: all)."})


@dataclass
class FinetuningArguments(PretrainingArguments):
    """The pretraining defaults, with those of a fine-tuning run."""

    output_dir: str = field(default=str(paths.SFT_OUTPUT), metadata={"help": "Checkpoints and the final model."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate, after warm-up."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Linear warm-up steps (a float < 1 is a ratio)."})
    eval_strategy: str = field(
        default="no", metadata={"help": "When to evaluate on --validation_files: no (only at the end), steps, epoch."})
    save_steps: float = field(default=500, metadata={"help": "Save a checkpoint every N steps."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "group_by_length (default: batches of similar lengths, little padding), random, "
                          "sequential.", "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]})
    include_num_input_tokens_seen: str = field(  # str: the parser would read `str | bool` as a bool
        default="non_padding", metadata={"help": "Count the tokens seen (num_input_tokens_seen): non_padding, all, "
                                                 "no.", "choices": ["non_padding", "all", "no"]})


# What each training script parses, in this order (the launcher checks the flags against them before starting ranks).
PRETRAINING_ARGUMENTS = (ModelArguments, DataTrainingArguments, SampleArguments, BenchmarkArguments, PretrainingArguments)
FINETUNING_ARGUMENTS = (FinetuningModelArguments, SFTDataArguments, SampleArguments, BenchmarkArguments, FinetuningArguments)
