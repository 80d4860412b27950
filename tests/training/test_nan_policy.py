"""What SafeTrainer does at a non-finite loss: stop by default, or with --nan_policy skip, skip the batch (counted in
the logs) and stop only after --max_nan_skips in a row. The bad batches are injected with a forward hook on a real
tiny model: the policy, not the model, is under test."""
import pytest
import torch
from transformers import AutoModelForCausalLM, default_data_collator

from seqlm.model import load_config
from seqlm.training.arguments import PretrainingArguments
from seqlm.training.trainer import NonFiniteLoss, SafeTrainer

SEQ = 16


class Blocks(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 1000, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def trainer_with_bad_batches(tmp_path, bad: set[int], **args) -> SafeTrainer:
    """A trainer whose training forward passes number `bad` (1 = the first) return a NaN loss."""
    torch.manual_seed(0)
    config = load_config("tiny")
    config.update(dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1))
    model = AutoModelForCausalLM.from_config(config)
    calls = []

    def poison(module, inputs, kwargs, output):
        if module.training:
            calls.append(1)
            if len(calls) in bad:
                output["loss"] = output["loss"] * float("nan")
        return output

    model.register_forward_hook(poison, with_kwargs=True)
    training_args = PretrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2,
                                         gradient_accumulation_steps=1, max_steps=6, logging_steps=1, report_to="none",
                                         save_strategy="no", eval_strategy="no", disable_tqdm=True, warmup_steps=0,
                                         activation_checkpointing="false", **args)
    return SafeTrainer(model=model, args=training_args, train_dataset=Blocks(), data_collator=default_data_collator)


def test_a_non_finite_loss_stops_by_default(tmp_path):
    trainer = trainer_with_bad_batches(tmp_path, bad={3})
    with pytest.raises(NonFiniteLoss, match=r"^the loss is nan at step 3: stopping"):
        trainer.train()


def test_skip_policy_skips_the_bad_batch_and_counts_it(tmp_path):
    trainer = trainer_with_bad_batches(tmp_path, bad={3, 5}, nan_policy="skip")
    trainer.train()
    assert trainer.state.global_step == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h.get("nan_batches_skipped", 0) for h in logs] == [0, 0, 1, 1, 2, 2]
    assert [h["loss"] for h in logs][2] == 0.0  # the skipped batch contributes nothing


def test_skip_policy_stops_after_too_many_in_a_row(tmp_path):
    trainer = trainer_with_bad_batches(tmp_path, bad={2, 3, 4}, nan_policy="skip", max_nan_skips=2)
    with pytest.raises(NonFiniteLoss, match=r"^3 non-finite losses in a row at step 4 \(--max_nan_skips 2\)"):
        trainer.train()
