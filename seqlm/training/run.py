"""What a training script does around the Trainer, the same for pretraining and fine-tuning: read the arguments, set
up logging, stop on bad input with one line, find the checkpoint to resume from, and train → save → evaluate →
report."""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

import torch
import torch.distributed as dist
import transformers
import yaml
from transformers import HfArgumentParser, TrainerState, TrainingArguments

from seqlm import outputs
from seqlm.evaluation.report import write_report
from seqlm.evaluation.tracking import start_swanlab
from seqlm.training.checkpoints import agreed_checkpoint, export_model, latest_complete_checkpoint
from seqlm.training.settings import (
    DEFAULT_ACCUMULATION,
    batch_split,
    check_same_run,
    ranks,
    settings_global_batch,
)
from seqlm.training.trainer import NonFiniteLoss, SafeTrainer
from seqlm.training.universal import universal_checkpoint

log = logging.getLogger(__name__)
LOW_DISK = 1e9  # bytes: below this, a failure of torch.save's writer is taken for a full disk
LAUNCHER_GRACE = 30  # seconds a rank that lost a peer leaves its launcher to stop it (which polls every second)
SECRETS_FILE = "SEQLM_SECRETS_FILE"  # set by the launcher on the nodes it starts over ssh


def fail(message: str) -> NoReturn:
    """Bad input stops the run before any heavy work, with one line that says what and how to fix it."""
    log.error(message)
    sys.exit(2)


def read_forwarded_secrets() -> None:
    """The tokens and keys the launcher gave this node over ssh (a file only the user can read: seqlm.training.launch),
    into the environment, where huggingface_hub and swanlab look for them. Variables set on the node itself win."""
    path = os.environ.pop(SECRETS_FILE, None)
    if path is None:
        return
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as e:
        fail(f"cannot read the run's tokens that the launcher copied to this node ({e}): check that ssh from the first "
             "node reaches this one as the same user, and rerun")
    for line in lines:
        name, _, value = line.partition("=")
        os.environ.setdefault(name, value)


ARGS_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple:
    """The dataclasses, from command-line flags, or from a .json or .yaml file of them that flags may follow:
    `pretrain.py args.yaml --learning_rate 3e-4`. The file's values stand in for the defaults, so a flag wins over
    the file wherever it stands."""
    read_forwarded_secrets()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(dataclass_types)
    try:
        # The file is the one argument no flag takes as its value (`--deepspeed ds.json` is a flag's).
        _, rest = parser.parse_known_args(argv)
        files = [a for a in rest if not a.startswith("-") and a.endswith(ARGS_FILE_SUFFIXES)]
        if len(files) > 1:
            raise ValueError(f"{len(files)} files of arguments ({', '.join(files)}): pass one, and flags after it")
        if files:
            names = {f.name for dtype in dataclass_types for f in dataclasses.fields(dtype)}
            values = read_args_file(files[0], names)
            # argparse parses a default that is a string as if typed, and a list flag's letter by letter: one file
            # written as a string (`train_files: a.jsonl`) would become [a, ., j, ...].
            lists = {a.dest for a in parser._actions if a.nargs in ("+", "*")}
            parser.set_defaults(**{k: [v] if k in lists and isinstance(v, str) else v for k, v in values.items()})
            argv.remove(files[0])
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except (OSError, ValueError) as e:  # a value the arguments' own checks refuse: one line, not a traceback
        fail(str(e).splitlines()[0])
    for args in parsed:
        if getattr(args, "hub_token", None):  # huggingface_hub reads it from the environment; saved arguments must not
            os.environ["HF_TOKEN"], args.hub_token = args.hub_token, None
    return tuple(parsed)


def read_args_file(path: str, names: set[str]) -> dict:
    """The {argument: value} mapping of a .json or .yaml file; ValueError, in one line, for anything else."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                         f"{str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must map argument names to values ({{\"learning_rate\": 3e-4, ...}})")
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown argument {', '.join(unknown)} (`python {Path(sys.argv[0]).name} --help` "
                         "lists them)")
    return values


def setup_logging(training_args: TrainingArguments) -> None:
    level = training_args.get_process_log_level()
    # --log_level passive (the default) is transformers' own: warnings only, which would hide this pipeline's progress
    # lines (data summary, resuming from, model saved in) too. They are info, on the process that logs.
    ours = logging.INFO if training_args.log_level == "passive" and training_args.should_log else level
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=ours, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity(level)


def checkpoint_to_resume(training_args: TrainingArguments, settings: dict) -> tuple[str | None, bool]:
    """(checkpoint, finished): --resume_from_checkpoint when given, else the newest complete checkpoint-N in
    --output_dir, so that a rerun continues; finished when training had already reached its last step there, so that
    a rerun of a finished run trains no further. A checkpoint written with other `settings` is refused (ValueError),
    one written by another number of ranks with the same global batch is converted for this one."""
    if not training_args.do_train:
        return training_args.resume_from_checkpoint, False
    last = training_args.resume_from_checkpoint or agreed_checkpoint(training_args.output_dir)
    if last is None:
        return None, False
    last = Path(last)
    check_same_run(last, settings)
    state = outputs.read_json(last / outputs.TRAINER_STATE_FILE)
    step = state["global_step"]
    if training_args.max_steps > 0:
        finished = step >= training_args.max_steps
    else:  # the same data (run_settings.json), so the same number of steps an epoch
        finished = step >= state["max_steps"] and training_args.num_train_epochs <= state["num_train_epochs"]
    if finished:
        log.info("training finished at step %d (%s): nothing is trained again; only what is missing of the final "
                 "model, evaluation and report is completed", step, last)
        return str(last), True
    before = outputs.read_run_settings(last)
    if before is not None and before["world_size"] != settings["world_size"]:
        log.info("resuming from %s, written by %s (%s), on %s (%s): the same global batch of %d sequences a step",
                 last, ranks(before["world_size"]), batch_split(before), ranks(settings["world_size"]),
                 batch_split(settings), settings_global_batch(settings))
        return str(universal_checkpoint(last, training_args)), False
    log.info("resuming from %s", last)
    return str(last), False




def start_tracking(training_args: TrainingArguments, swanlab_run_mode: str | None, config: dict) -> None:
    """On the first process: start the swanlab run (or continue it)."""
    if training_args.process_index == 0 and swanlab_run_mode:
        start_swanlab(training_args.output_dir, training_args.run_name, config=config, mode=swanlab_run_mode)


@contextmanager
def one_line_on_failure(training_args: TrainingArguments) -> Iterator[None]:
    """Failures an operator meets on a long run end in one line that says what happened and what to do: a non-finite
    loss, GPU memory exhausted, a full disk, another rank that died, each told by the error's type, errno and origin
    (not its wording, nor the free space alone). A rerun of the same command resumes from the newest complete
    checkpoint; an unfinished one is skipped."""
    try:
        yield
    except NonFiniteLoss as e:
        fail(str(e))
    except torch.OutOfMemoryError as e:
        # A micro-batch given alone makes its own global batch (x DEFAULT_ACCUMULATION x GPUs): another run, which
        # would not resume this one. Naming the global batch keeps it.
        micro, global_batch = training_args.per_device_train_batch_size, training_args.global_batch_size
        fail(f"rank {training_args.process_index} ran out of GPU memory ({str(e).splitlines()[0][:200]}) with a "
             f"micro-batch of {micro} (the log's memory plan line says where it goes): rerun with "
             f"--per_device_train_batch_size {max(1, micro // 2)} --global_batch_size {global_batch} (the same global "
             f"batch, more accumulation steps; a micro-batch alone would make it micro-batch x {DEFAULT_ACCUMULATION} "
             "x GPUs), or --activation_checkpointing true, or --per_device_train_batch_size auto; "
             f"{resume_hint(training_args)}")
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(training_args.output_dir).free
        if full_disk(e, free):
            error = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            fail(f"the disk of {training_args.output_dir} is full ({free / 1e9:.2f} GB free; the error: {error}): "
                 f"free some space or point --output_dir elsewhere; {resume_hint(training_args)}")
        if lost_peer(e):
            log.error(f"rank {training_args.process_index} of {training_args.world_size} lost contact with another "
                      f"rank, which stopped (its own lines above say why): {resume_hint(training_args)}")
            wait_for_the_launcher()
            sys.exit(2)
        raise


def wait_for_the_launcher() -> None:
    """The launcher stops every rank of its node once one has ended with an error, and names the exit code of the
    first it finds ended (seqlm.training.launch repeats it): a rank that only lost a dead peer, exiting on its own, could be found
    first, and its code (2) would hide the dead rank's (-9: out of memory). So it waits to be stopped; a peer that died
    on another node is not its own launcher's to see, so after LAUNCHER_GRACE it goes anyway. A rank started
    without a launcher (no LOCAL_RANK) exits at once."""
    if "LOCAL_RANK" in os.environ:
        time.sleep(LAUNCHER_GRACE)


def resume_hint(training_args: TrainingArguments) -> str:
    last = latest_complete_checkpoint(training_args.output_dir, quiet=True)
    return f"rerunning the same command resumes from {last or 'the start (no complete checkpoint yet)'}"


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and those it was raised from or while handling."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _raised_in(error: BaseException, where: str) -> bool:
    """Whether a frame of the error's traceback is in the file or folder `where`."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(where):
            return True
        tb = tb.tb_next
    return False


def full_disk(error: BaseException, free: int) -> bool:
    """ENOSPC or EDQUOT anywhere in the chain; or torch.save's writer failing, which carries no errno ("file write
    failed", "unexpected pos"), on a disk with less than LOW_DISK free. Not any error on a nearly full disk."""
    if any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in _chain(error)):
        return True
    return free < LOW_DISK and isinstance(error, RuntimeError) and _raised_in(error, torch.serialization.__file__)


def lost_peer(error: BaseException) -> bool:
    """torch.distributed's own error types (NCCL: DistBackendError, the store: DistNetworkError); gloo raises a plain
    RuntimeError from inside the collective, which is what identifies it."""
    return isinstance(error, dist.DistError) or (
        type(error) is RuntimeError and _raised_in(error, os.path.dirname(dist.__file__) + os.sep))


def evaluation_of_last_step(state: TrainerState) -> dict | None:
    """The metrics of an evaluation logged at the last step, if there was one: it scored the final weights already
    (the Trainer evaluates a step before saving it), and on a real held-out set another pass costs minutes."""
    logged = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    if logged is None or logged["step"] != state.global_step:
        return None
    return {k: v for k, v in logged.items() if k != "step"}


def train_and_evaluate(trainer: SafeTrainer, training_args: TrainingArguments, evaluating: bool,
                       resume_from: str | None, finished: bool) -> None:
    """Train (or, for a finished run, take the final model from its last checkpoint), save, evaluate, report."""
    output_dir = Path(training_args.output_dir)
    if finished:
        trainer.state = TrainerState.load_from_json(str(Path(resume_from) / outputs.TRAINER_STATE_FILE))
        final = outputs.read_json(output_dir / outputs.TRAINER_STATE_FILE)
        if final is None or final["global_step"] != trainer.state.global_step:
            if training_args.process_index == 0:
                export_model(Path(resume_from), output_dir)
            log.info("final model of step %d: %s", trainer.state.global_step, output_dir)
        evaluating &= outputs.read_json(output_dir / outputs.EVAL_RESULTS_FILE) is None  # the closing one is missing
    elif training_args.do_train:
        with one_line_on_failure(training_args):
            result = trainer.train(resume_from_checkpoint=resume_from)
            trainer.save_model()  # model + tokenizer, safetensors, loadable by stock from_pretrained
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if evaluating:
        # ThroughputCallback adds eval_perplexity
        metrics = evaluation_of_last_step(trainer.state) or trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.process_index == 0:
        log.info("model saved in %s", training_args.output_dir)
        if training_args.do_train:
            log.info("report: %s", write_report(training_args.output_dir))
