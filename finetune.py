"""Fine-tune (SFT) a causal language model, by default our pretrained one, on conversations: BelleGroup
train_3.5M_CN, or any JSON Lines file in its schema or the `messages` schema.

Launch it with `bash finetune.sh` (DeepSpeed ZeRO-2, any number of GPUs or CPU ranks), as pretraining. Every
TrainingArguments flag works; `python finetune.py --help` lists them with their defaults, and a single .json or .yaml
file of them works too. The story of a run, top to bottom:
parse → check inputs → tokenize once, with the loss mask (cached) → model → Trainer → train (resuming if it can) →
evaluate → save with the chat template, ready for chat.py.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Subset
from transformers import set_seed

from seqlm import paths
from seqlm.arguments import BenchmarkArguments, ModelArguments, PretrainingArguments, SampleArguments
from seqlm.benchmark_callback import BenchmarkCallback
from seqlm.checkpoint import check_checkpoint
from seqlm.memory import check_gpu_memory
from seqlm.model import build_model, check_compatible, document_separator, load_config
from seqlm.preflight import check_disk, check_ds_config, check_readable, check_same_run
from seqlm.report import RunRecordCallback
from seqlm.samples import SamplesCallback
from seqlm.sft import (ConversationDataset, PadToLongest, SFTTrainer, build_sft_cache, prepare_chat_tokenizer,
                       set_chat_eos)
from seqlm.tokenizer import load_tokenizer
from seqlm.tracking import swanlab_mode
from seqlm.training import checkpoint_to_resume, fail, parse_args, record_run, setup_logging, train_and_evaluate

log = logging.getLogger("finetune")


@dataclass
class FinetuningModelArguments(ModelArguments):
    model_name_or_path: str | None = field(
        default=str(paths.PRETRAIN_OUTPUT),
        metadata={"help": "The model to fine-tune: an HF checkpoint folder (default: what pretrain.sh wrote) or a "
                          "hub id."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or hub id (default: the model's own)."})


@dataclass
class SFTDataArguments:
    train_files: list[str] = field(
        default_factory=lambda: [str(paths.SFT_FILE)],
        metadata={"help": "Conversations, JSON Lines: {\"conversations\": [{\"from\": \"human\"|\"assistant\", "
                          "\"value\": ...}]} (BELLE) or {\"messages\": [{\"role\": ..., \"content\": ...}]}."})
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

    output_dir: str = field(default="output/sft", metadata={"help": "Checkpoints and the final model."})
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


def conversations(files: list[str], tokenizer, data_args: SFTDataArguments, training_args) -> ConversationDataset:
    """Tokenize each file once (the first process per machine builds, the others wait), then cut to max_length."""
    with training_args.main_process_first(desc="tokenizing"):
        folders = [build_sft_cache(f, tokenizer, data_args.system_prompt, data_args.token_cache_dir) for f in files]
    return ConversationDataset(folders, data_args.max_length)


def run_settings(model_path: str, data_args: SFTDataArguments, training_args) -> dict:
    """What a checkpoint's meaning depends on: a rerun that resumes must have the same."""
    local = Path(model_path).exists()
    return {"model": str(Path(model_path).resolve()) if local else model_path,
            "train_files": [str(Path(f).resolve()) for f in data_args.train_files],
            "max_length": data_args.max_length, "system_prompt": data_args.system_prompt,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "world_size": training_args.world_size, "seed": training_args.seed}


def main() -> None:
    model_args, data_args, sample_args, benchmark_args, training_args = parse_args(
        (FinetuningModelArguments, SFTDataArguments, SampleArguments, BenchmarkArguments, FinetuningArguments))
    setup_logging(training_args)
    evaluating = bool(data_args.validation_files)

    # Everything is checked first: a typo must not cost a model load or an hour of tokenizing.
    model_path = model_args.model_name_or_path
    try:
        if training_args.eval_strategy != "no" and not evaluating:
            raise ValueError(f"--eval_strategy {training_args.eval_strategy.value} needs held-out conversations: "
                             "pass --validation_files (VALIDATION_FILE= with finetune.sh)")
        check_readable(data_args.train_files + data_args.validation_files, hint=(
            "fetch BELLE with `python download_dataset.py --sft` (and cut a subset with `python make_subset.py "
            "--schema sft`), or pass TRAIN_FILE= / --train_files"))
        check_ds_config(training_args)
        if model_path == str(paths.PRETRAIN_OUTPUT) and not Path(model_path).is_dir():
            raise ValueError(f"no pretrained model in {model_path}: pretrain first (`bash pretrain.sh`), or pass "
                             "MODEL= / --model_name_or_path")
        check_checkpoint(model_path)
        config = load_config(model_path)
        tokenizer = load_tokenizer(model_args.tokenizer_name or model_path)
        if data_args.max_length > config.max_position_embeddings:
            raise ValueError(f"--max_length {data_args.max_length} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}: lower it")
        check_compatible(config, tokenizer, data_args.max_length)
        prepare_chat_tokenizer(tokenizer, data_args.system_prompt)
        samples = SamplesCallback.from_args(sample_args, tokenizer, chat=True)  # each prompt as a user turn
        benchmark = BenchmarkCallback.from_args(benchmark_args, tokenizer, max_length=data_args.max_length,
                                                separator_id=document_separator(config))
        swanlab_run_mode = swanlab_mode() if "swanlab" in training_args.report_to else None
        settings = run_settings(model_path, data_args, training_args)
        check_same_run(training_args.output_dir, settings)
        check_disk(config, data_args.train_files + data_args.validation_files, data_args.token_cache_dir,
                   training_args.output_dir)
        # Batches are padded to their longest: at worst --max_length.
        check_gpu_memory(config, data_args.max_length, training_args)
    except (OSError, ValueError) as e:
        fail(str(e).splitlines()[0])

    resume_from = checkpoint_to_resume(training_args)
    set_seed(training_args.seed)

    try:
        train_dataset = conversations(data_args.train_files, tokenizer, data_args, training_args)
        eval_dataset = None
        if evaluating:
            eval_dataset = conversations(data_args.validation_files, tokenizer, data_args, training_args)
    except ValueError as e:
        fail(str(e).splitlines()[0])
    log.info("training: %s", train_dataset.summary())
    if eval_dataset is not None:
        log.info("evaluation: %s", eval_dataset.summary())
        if data_args.max_eval_samples is not None:
            eval_dataset = Subset(eval_dataset, range(min(data_args.max_eval_samples, len(eval_dataset))))

    model = build_model(config, model_path, model_args.attn_implementation)
    set_chat_eos(model, tokenizer)
    record_run(training_args, settings, swanlab_run_mode, config={**vars(model_args), **vars(data_args)})

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, data_collator=PadToLongest(tokenizer.pad_token_id),
                         seq_len=round(train_dataset.lengths.mean()))  # MFU: the mean conversation, padding excluded
    trainer.add_callback(samples)
    if benchmark is not None:
        benchmark.throughput = trainer.throughput  # the suite's time is not training time
        trainer.add_callback(benchmark)
    trainer.add_callback(RunRecordCallback(model_args, data_args, sample_args, benchmark_args))
    train_and_evaluate(trainer, training_args, evaluating, resume_from)


if __name__ == "__main__":
    main()
