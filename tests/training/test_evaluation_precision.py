"""The evaluation without DeepSpeed's engine (the closing evaluation of a finished run that is rerun, --do_train false)
runs in the run's precision, as the evaluations during training do: one CPU rank under DeepSpeed ZeRO-2 in bf16."""
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, free_port

pytestmark = pytest.mark.slow  # a DeepSpeed run and two evaluations on a CPU rank in bf16: 15-45 s

# One process of its own: DeepSpeed joins a process group, and accelerate's state outlives the test in this one.
# Trains 2 steps under the engine with an evaluation at the last, saves; then evaluates the saved model, loaded in
# fp32 as pretrain.py loads a finished run's last checkpoint, in a Trainer that never trained. A hook on the final
# norm records the dtype of the hidden states each evaluation ran in.
RUN = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, default_data_collator
from seqlm.model import load_config
from seqlm.training.arguments import PretrainingArguments
from seqlm.training.trainer import SafeTrainer

out = sys.argv[1]
config = load_config("tiny", "hidden_size=32,intermediate_size=64,num_attention_heads=4,num_key_value_heads=2")
blocks = [{"input_ids": ids, "labels": ids}
          for ids in torch.randint(0, 1000, (8, 16), generator=torch.Generator().manual_seed(0))]
seen = []


def trainer(model, folder):
    model.model.norm.register_forward_hook(lambda module, inputs, output: seen.append(str(output.dtype)))
    args = PretrainingArguments(output_dir=f"{out}/{folder}", use_cpu=True, bf16=True,
                                deepspeed="ds_config_zero2.json", per_device_train_batch_size=2,
                                gradient_accumulation_steps=1, per_device_eval_batch_size=4, max_steps=2,
                                eval_strategy="steps", eval_steps=2, save_strategy="no", report_to="none",
                                disable_tqdm=True, activation_checkpointing="false")
    return SafeTrainer(model=model, args=args, train_dataset=blocks, eval_dataset=blocks,
                       data_collator=default_data_collator)


torch.manual_seed(0)
training = trainer(AutoModelForCausalLM.from_config(config, dtype=torch.float32), "trained")
training.train()
training.save_model()
logged = next(h for h in reversed(training.state.log_history) if "eval_loss" in h)
in_training = {"dtypes": sorted(set(seen)), "loss": logged["eval_loss"]}
seen.clear()
plain = AutoModelForCausalLM.from_pretrained(f"{out}/trained", dtype=torch.float32)
loss = trainer(plain, "closing").evaluate()["eval_loss"]
without_engine = {"dtypes": sorted(set(seen)), "loss": loss}
print(json.dumps({"in_training": in_training, "without_engine": without_engine,
                  "buffers": sorted({str(b.dtype) for b in plain.buffers()})}))
"""


@pytest.fixture(scope="module")
def evaluations(module_tmp):
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", RUN, str(module_tmp("precision"))], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_evaluation_without_the_engine_runs_in_the_runs_precision(evaluations):
    assert evaluations["in_training"]["dtypes"] == ["torch.bfloat16"]  # DeepSpeed's engine casts the module
    assert evaluations["without_engine"]["dtypes"] == ["torch.bfloat16"]  # was torch.float32: the model as loaded


def test_the_closing_evaluation_gives_the_last_steps_numbers(evaluations):
    # The same bf16 weights (the saved ones), computed alike; RoPE's inv_freq stays fp32 in both, as DeepSpeed keeps
    # buffers. In fp32 it was 11.929228 against 11.929203.
    assert evaluations["without_engine"]["loss"] == evaluations["in_training"]["loss"]
    assert evaluations["buffers"] == ["torch.float32"]
