"""What a training script does around the Trainer, the same for pretraining and fine-tuning: read the arguments, set
up logging, stop on bad input with one line, find the checkpoint to resume from, and train → save → evaluate →
report."""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import transformers
from transformers import HfArgumentParser, TrainingArguments

from .checkpoints import latest_complete_checkpoint
from .preflight import save_run_settings
from .report import write_report
from .tracking import start_swanlab
from .trainer import NonFiniteLoss, SafeTrainer

log = logging.getLogger(__name__)


def fail(message: str) -> NoReturn:
    """Bad input stops the run before any heavy work, with one line that says what and how to fix it."""
    log.error(message)
    sys.exit(2)


def parse_args(dataclass_types: tuple[type, ...]) -> tuple:
    """The dataclasses, from command-line flags or from a single .json or .yaml file of them."""
    parser = HfArgumentParser(dataclass_types)
    try:
        if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
            parsed = parser.parse_json_file(os.path.abspath(sys.argv[1]))
        elif len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
            parsed = parser.parse_yaml_file(os.path.abspath(sys.argv[1]))
        else:
            parsed = parser.parse_args_into_dataclasses()
    except ValueError as e:  # a value the arguments' own checks refuse: one line, not a traceback
        fail(str(e).splitlines()[0])
    for args in parsed:
        if getattr(args, "hub_token", None):  # huggingface_hub reads it from the environment; saved arguments must not
            os.environ["HF_TOKEN"], args.hub_token = args.hub_token, None
    return tuple(parsed)


def setup_logging(training_args: TrainingArguments) -> None:
    level = training_args.get_process_log_level()
    # --log_level passive (the default) is transformers' own: warnings only, which would hide this pipeline's progress
    # lines (data summary, resuming from, model saved in) too. They are info, on the process that logs.
    ours = logging.INFO if training_args.log_level == "passive" and training_args.should_log else level
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=ours, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity(level)


def checkpoint_to_resume(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint when given, else the newest complete checkpoint-N in --output_dir: a rerun continues."""
    if training_args.resume_from_checkpoint is not None or not training_args.do_train:
        return training_args.resume_from_checkpoint
    last = latest_complete_checkpoint(training_args.output_dir)
    if last:
        log.info("resuming from %s", last)
    return str(last) if last else None


def record_run(training_args: TrainingArguments, settings: dict, swanlab_run_mode: str | None, config: dict) -> None:
    """On the first process: save the settings a rerun must match to resume, and start the swanlab run."""
    if training_args.process_index != 0:
        return
    save_run_settings(training_args.output_dir, settings)
    if swanlab_run_mode:
        start_swanlab(training_args.output_dir, training_args.run_name, config=config, mode=swanlab_run_mode)


def train_and_evaluate(trainer: SafeTrainer, training_args: TrainingArguments, evaluating: bool,
                       resume_from: str | None) -> None:
    if training_args.do_train:
        try:
            result = trainer.train(resume_from_checkpoint=resume_from)
        except NonFiniteLoss as e:
            fail(str(e))
        trainer.save_model()  # model + tokenizer, safetensors, loadable by stock from_pretrained
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if evaluating:
        metrics = trainer.evaluate()  # ThroughputCallback adds eval_perplexity
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.process_index == 0:
        log.info("model saved in %s", training_args.output_dir)
        if training_args.do_train:
            log.info("report: %s", write_report(training_args.output_dir))
