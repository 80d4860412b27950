"""Pretrain a causal language model from scratch (default: the Qwen2.5-0.5B architecture) on a JSON Lines corpus.

Launch it with `bash pretrain.sh` (DeepSpeed ZeRO-2, any number of GPUs or CPU ranks). Arguments are those of
transformers' run_clm.py plus every TrainingArguments flag; `python pretrain.py --help` lists them all, and a
single .json or .yaml file of them works too. The story of a run, top to bottom:
parse → check inputs → tokenize once (cached) → model → Trainer → train (resuming if it can) → evaluate → save.
"""
import logging

from torch.utils.data import ConcatDataset, Subset
from transformers import default_data_collator, set_seed

from seqlm.data.token_cache import BlockDataset, build_token_cache
from seqlm.evaluation.benchmark_callback import BenchmarkCallback
from seqlm.evaluation.heldout import BitsPerCharCallback, EvaluatedText
from seqlm.evaluation.report import RunRecordCallback
from seqlm.evaluation.tracking import swanlab_mode
from seqlm.model import build_model, end_text_with_separator, load_config_and_tokenizer
from seqlm.outputs import PRETRAINING
from seqlm.training.arguments import PRETRAINING_ARGUMENTS, DataTrainingArguments
from seqlm.training.fit import fit_to_device
from seqlm.training.preflight import check_disk, check_ds_config, check_readable
from seqlm.training.run import checkpoint_to_resume, fail, parse_args, setup_logging, start_tracking, train_and_evaluate
from seqlm.training.samples import SamplesCallback
from seqlm.training.settings import pretraining_settings
from seqlm.training.trainer import SafeTrainer

log = logging.getLogger("pretrain")


def blocks(files: list[str], tokenizer, separator_id: int, vocab_size: int, data_args: DataTrainingArguments):
    """Tokenize each file once (the first process per machine builds, the others wait), then cut blocks."""
    # Every rank asks: the cache's file lock lets one build while the others wait, with no timeout. A barrier around
    # it would be bounded by --ddp_timeout (30 min), less than the whole corpus takes to tokenize.
    folders = [build_token_cache(f, tokenizer, separator_id, data_args.token_cache_dir) for f in files]
    datasets = [BlockDataset(folder, data_args.block_size) for folder in folders]
    for d in datasets:
        d.cache.check_ids(vocab_size)
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def main() -> None:
    model_args, data_args, sample_args, benchmark_args, training_args = parse_args(PRETRAINING_ARGUMENTS)
    setup_logging(training_args)
    evaluating = training_args.eval_strategy != "no" or training_args.do_eval

    # Everything is checked first: a typo must not cost a model build or an hour of tokenizing.
    try:
        check_readable(data_args.train_files + (data_args.validation_files if evaluating else []), hint=(
            "make it with `python download_dataset.py && python make_subset.py` (or `make demo` for the offline "
            "sample), or pass --train_files / --validation_files (or --eval_strategy no to train without one)"))
        config, tokenizer, separator_id = load_config_and_tokenizer(model_args, data_args.block_size)
        end_text_with_separator(tokenizer, separator_id)
        swanlab_run_mode = swanlab_mode() if "swanlab" in training_args.report_to else None
        samples = SamplesCallback.from_args(sample_args, tokenizer)
        benchmark = BenchmarkCallback.from_args(benchmark_args, tokenizer, max_length=data_args.block_size,
                                                separator_id=separator_id, heldout_file=data_args.validation_files[0])
        # Precision, attention and the batch shape from the device: the checks below see the final ones.
        training_args = fit_to_device(config, data_args.block_size, training_args, model_args)
        check_ds_config(training_args, benchmarking=benchmark is not None)
        settings = pretraining_settings(config, data_args, training_args)
        check_disk(config, data_args.train_files + data_args.validation_files, data_args.token_cache_dir,
                   training_args.output_dir, training_args.save_total_limit, training_args.save_strategy)
        resume_from, finished = checkpoint_to_resume(training_args, settings)  # last: it may convert one
    except (OSError, ValueError) as e:
        fail(str(e).splitlines()[0])

    set_seed(training_args.seed)

    try:
        train_dataset = blocks(data_args.train_files, tokenizer, separator_id, config.vocab_size, data_args)
    except ValueError as e:  # a damaged cache, or a corpus with no valid line
        fail(str(e).splitlines()[0])
    log.info("training on %s blocks of %d tokens (%s tokens)", f"{len(train_dataset):,}", data_args.block_size,
             f"{len(train_dataset) * data_args.block_size:,}")
    eval_dataset = held_out = None
    if evaluating:
        try:
            eval_dataset = blocks(data_args.validation_files, tokenizer, separator_id, config.vocab_size, data_args)
        except ValueError as e:
            fail(str(e).splitlines()[0])
        if data_args.max_eval_samples is not None:
            eval_dataset = Subset(eval_dataset, range(min(data_args.max_eval_samples, len(eval_dataset))))
        held_out = EvaluatedText.of(eval_dataset, tokenizer, separator_id)
        log.info("evaluating on %s", held_out.describe())

    # A finished run is not trained again: its final weights are those of its last checkpoint.
    model = build_model(config, resume_from if finished else model_args.model_name_or_path,
                        model_args.attn_implementation)
    start_tracking(training_args, swanlab_run_mode, config={**vars(model_args), **vars(data_args)})

    trainer = SafeTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=tokenizer, data_collator=default_data_collator,
                          run_settings=settings, seq_len=data_args.block_size)
    if held_out is not None:
        trainer.add_callback(BitsPerCharCallback(held_out))
    trainer.add_callback(samples)
    samples.throughput = trainer.throughput  # generating is not training
    if benchmark is not None:
        benchmark.throughput = trainer.throughput  # the suite's time is not training time
        trainer.add_callback(benchmark)
    trainer.add_callback(RunRecordCallback(PRETRAINING, (model_args, data_args, sample_args, benchmark_args),
                                           held_out.describe() if held_out else None))

    train_and_evaluate(trainer, training_args, evaluating, resume_from, finished)


if __name__ == "__main__":
    main()
