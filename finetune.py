"""Fine-tune (SFT) a causal language model, by default our pretrained one, on conversations: BelleGroup
train_3.5M_CN, or any JSON Lines file in its schema or the `messages` schema.

Launch it with `bash finetune.sh` (DeepSpeed ZeRO-2, any number of GPUs or CPU ranks), as pretraining. Every
TrainingArguments flag works; `python finetune.py --help` lists them with their defaults, and a single .json or .yaml
file of them works too. The story of a run, top to bottom:
parse → check inputs → tokenize once, with the loss mask (cached) → model → Trainer → train (resuming if it can) →
evaluate → save with the chat template, ready for chat.py.
"""
import logging
from pathlib import Path

from torch.utils.data import Subset
from transformers import set_seed

from seqlm import paths
from seqlm.data.conversation import prepare_chat_tokenizer, set_chat_eos
from seqlm.data.sft_cache import ConversationDataset, build_sft_cache
from seqlm.evaluation.benchmark_callback import BenchmarkCallback
from seqlm.evaluation.report import RunRecordCallback
from seqlm.evaluation.tracking import swanlab_mode
from seqlm.model import build_model, check_compatible, document_separator, load_config
from seqlm.model_folder import check_model_folder
from seqlm.outputs import FINE_TUNING
from seqlm.tokenizer import load_tokenizer
from seqlm.training.arguments import FINETUNING_ARGUMENTS, SFTDataArguments
from seqlm.training.fit import fit_to_device
from seqlm.training.preflight import check_disk, check_ds_config, check_readable
from seqlm.training.run import checkpoint_to_resume, fail, parse_args, setup_logging, start_tracking, train_and_evaluate
from seqlm.training.samples import SamplesCallback
from seqlm.training.settings import fine_tuning_settings
from seqlm.training.sft import PadToLongest, SFTTrainer

log = logging.getLogger("finetune")


def conversations(files: list[str], tokenizer, data_args: SFTDataArguments) -> ConversationDataset:
    """Tokenize each file once (the first process per machine builds, the others wait), then cut to max_length."""
    # Every rank asks, as pretrain.py's do: the cache's file lock, not a barrier bounded by --ddp_timeout.
    folders = [build_sft_cache(f, tokenizer, data_args.system_prompt, data_args.token_cache_dir) for f in files]
    return ConversationDataset(folders, data_args.max_length)


def main() -> None:
    model_args, data_args, sample_args, benchmark_args, training_args = parse_args(FINETUNING_ARGUMENTS)
    setup_logging(training_args)
    evaluating = bool(data_args.validation_files)

    # Everything is checked first: a typo must not cost a model load or an hour of tokenizing.
    model_path = model_args.model_name_or_path
    try:
        if training_args.eval_strategy != "no" and not evaluating:
            raise ValueError(f"--eval_strategy {training_args.eval_strategy.value} needs held-out conversations: "
                             "pass --validation_files (VALIDATION_FILE= with finetune.sh)")
        check_readable(data_args.train_files + data_args.validation_files, hint=(
            "cut it once with `python download_dataset.py --sft && python make_subset.py --schema sft` (100,000 "
            f"conversations of BELLE), or pass TRAIN_FILE= / --train_files ({paths.SFT_FILE} trains on all 3.5M)"))
        if model_path == str(paths.PRETRAIN_OUTPUT) and not Path(model_path).is_dir():
            raise ValueError(f"no pretrained model in {model_path}: pretrain first (`bash pretrain.sh`), or pass "
                             "MODEL= / --model_name_or_path")
        check_model_folder(model_path)
        config = load_config(model_path)
        tokenizer = load_tokenizer(model_args.tokenizer_name or model_path)
        check_compatible(config, tokenizer, data_args.max_length, flag="--max_length")
        prepare_chat_tokenizer(tokenizer, data_args.system_prompt)
        samples = SamplesCallback.from_args(sample_args, tokenizer, chat=True)  # each prompt as a user turn
        benchmark = BenchmarkCallback.from_args(benchmark_args, tokenizer, max_length=data_args.max_length,
                                                separator_id=document_separator(config))
        swanlab_run_mode = swanlab_mode() if "swanlab" in training_args.report_to else None
        # Precision, attention and the batch shape from the device: the checks below see the final ones. Batches are
        # padded to their longest: at worst --max_length.
        training_args = fit_to_device(config, data_args.max_length, training_args, model_args)
        check_ds_config(training_args, benchmarking=benchmark is not None)
        settings = fine_tuning_settings(model_path, data_args, training_args)
        check_disk(config, data_args.train_files + data_args.validation_files, data_args.token_cache_dir,
                   training_args.output_dir, training_args.save_total_limit, training_args.save_strategy)
        resume_from, finished = checkpoint_to_resume(training_args, settings)  # last: it may convert one
    except (OSError, ValueError) as e:
        fail(str(e).splitlines()[0])

    set_seed(training_args.seed)

    try:
        train_dataset = conversations(data_args.train_files, tokenizer, data_args)
        eval_dataset = None
        if evaluating:
            eval_dataset = conversations(data_args.validation_files, tokenizer, data_args)
    except ValueError as e:
        fail(str(e).splitlines()[0])
    log.info("training: %s", train_dataset.summary())
    if eval_dataset is not None:
        log.info("evaluation: %s", eval_dataset.summary())
        if data_args.max_eval_samples is not None:
            eval_dataset = Subset(eval_dataset, range(min(data_args.max_eval_samples, len(eval_dataset))))

    # A finished run is not trained again: its final weights are those of its last checkpoint.
    model = build_model(config, resume_from if finished else model_path, model_args.attn_implementation)
    set_chat_eos(model, tokenizer)
    start_tracking(training_args, swanlab_run_mode, config={**vars(model_args), **vars(data_args)})

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, data_collator=PadToLongest(tokenizer.pad_token_id),
                         run_settings=settings,
                         seq_len=round(train_dataset.lengths.mean()))  # MFU: the mean conversation, padding excluded
    trainer.add_callback(samples)
    samples.throughput = trainer.throughput  # generating is not training
    if benchmark is not None:
        benchmark.throughput = trainer.throughput  # the suite's time is not training time
        trainer.add_callback(benchmark)
    trainer.add_callback(RunRecordCallback(FINE_TUNING, (model_args, data_args, sample_args, benchmark_args)))
    train_and_evaluate(trainer, training_args, evaluating, resume_from, finished)


if __name__ == "__main__":
    main()
