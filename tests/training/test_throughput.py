"""What every training log line says about speed: the share of time spent waiting for data, and peak memory, measured
by SafeTrainer on a real (tiny) model in this process."""
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments, default_data_collator

from seqlm.model import load_config
from seqlm.training.trainer import SafeTrainer

SEQ, BATCH, LOGGING_STEPS = 16, 2, 4


class Blocks(torch.utils.data.Dataset):
    """Random token blocks, each taking `delay` seconds to read."""

    def __init__(self, delay: float):
        self.delay = delay

    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(self.delay)
        ids = torch.randint(0, 1000, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def train_logs(tmp_path, delay: float) -> list[dict]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config("tiny"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=BATCH, max_steps=8,
                             logging_steps=LOGGING_STEPS, report_to="none", save_strategy="no", disable_tqdm=True,
                             include_num_input_tokens_seen=True, dataloader_num_workers=0)
    trainer = SafeTrainer(model=model, args=args, train_dataset=Blocks(delay), data_collator=default_data_collator,
                          seq_len=SEQ)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_data_wait_is_the_share_of_time_spent_reading_batches(tmp_path, delay):
    logs = train_logs(tmp_path, delay)
    assert len(logs) == 2
    tokens = LOGGING_STEPS * BATCH * SEQ  # per logging interval
    expected = LOGGING_STEPS * BATCH * delay  # seconds the dataset sleeps in one
    for log in logs:
        assert 0 <= log["data_wait_percent"] <= 100
        assert log["peak_memory_gb"] > 0.1  # this process holds at least torch and the model
        # Back from a share of the interval to seconds (the interval from tokens/s): the sleeps, and little else.
        interval = tokens / log["tokens_per_second"]
        waited = log["data_wait_percent"] / 100 * interval
        # At least the sleeps; beyond them, fetching is a small part of what is not sleep (bounds that hold on a
        # loaded machine too: both sides slow down together).
        assert 0.95 * expected <= waited <= expected + 0.5 * (interval - expected), (waited, expected, interval)


class SlowDisk(TrainerCallback):
    """A save that takes a second more: what writing the 0.5B model's 6 GB of optimizer state takes longer."""

    def on_save(self, args, state, control, **kwargs):
        time.sleep(1)


def test_samples_and_saves_are_left_out_of_the_interval(tmp_path):
    """The interval tokens/s and MFU are measured over starts later by the time spent generating samples and saving a
    checkpoint (the Trainer's own save, then its callbacks), as it already does for evaluations and benchmarks."""
    from transformers import AutoTokenizer

    from seqlm.data.demo import copy_offline_tokenizer
    from seqlm.training.samples import SamplesCallback

    copy_offline_tokenizer(tmp_path / "tokenizer")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config("tiny"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=BATCH, max_steps=1,
                             report_to="none", disable_tqdm=True, include_num_input_tokens_seen=True)
    trainer = SafeTrainer(model=model, args=args, train_dataset=Blocks(0.0), data_collator=default_data_collator,
                          seq_len=SEQ, callbacks=[SlowDisk()])
    samples = SamplesCallback(["今天"], AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), every=1, max_new_tokens=8)
    samples.throughput = trainer.throughput
    trainer.throughput.on_train_begin(args, trainer.state, trainer.control)
    started = trainer.throughput._last[0]
    samples.on_train_begin(args, trainer.state, trainer.control, model=model)  # samples the untrained model
    sampled = trainer.throughput._last[0]
    assert sampled > started
    trainer.create_optimizer_and_scheduler(num_training_steps=1)  # what a checkpoint saves besides the model
    trainer._save_checkpoint(model, None)
    trainer.callback_handler.on_save(args, trainer.state, trainer.control)  # as the Trainer follows its save
    assert trainer.throughput._last[0] - sampled > 1  # the save, the slow disk included
    from seqlm.training.checkpoints import CompleteCheckpoints

    next(c for c in trainer.callback_handler.callbacks if isinstance(c, CompleteCheckpoints)).wait()  # its marker
