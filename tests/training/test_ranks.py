"""Ranks that must agree: every rank plans for the same device, so that all take the same precision and batch shape
(ZeRO's collectives hang when their accumulation steps differ); and ranks that wait for another to tokenize, longer
than a collective's timeout."""
import re

import pytest
from helpers import NARROW_RUN, REPO, pretrain_sh, trainer_state

from seqlm.device import Device
from seqlm.training.fit import common_device, describe_mix

GB = 1e9
# Two stand-in cards for the narrow model at block 64: on the first a micro-batch of 8 fits 90% of its memory, on the
# second only 2 (memory plans of 2.80 and 2.03 GB); the first has the older compute capability.
STAND_INS = {0: dict(name="stand-in card A", total_memory=4.0 * GB, major=8, minor=0),
             1: dict(name="stand-in card B", total_memory=2.4 * GB, major=8, minor=6)}
# Each rank's Device.of reads its stand-in card's properties instead of the CPU: a file Python runs at start-up
# (sitecustomize) in every rank the launcher starts, and only there.
SITECUSTOMIZE = f"""
import os
if "LOCAL_RANK" in os.environ:
    import sys
    from types import SimpleNamespace
    sys.path.insert(0, {str(REPO)!r})
    from seqlm.device import Device
    card = SimpleNamespace(**{STAND_INS!r}[int(os.environ["RANK"])])
    Device.of = classmethod(lambda cls, training_args: cls.from_properties(card))
"""
# Seconds, for every collective of the ranks (torch's default for gloo, which CPU ranks use, is 1,800): far above
# what ranks doing the same work drift apart by on a loaded machine.
TIMEOUT = 30
# Each rank's collectives time out after TIMEOUT, and tokenizing takes twice as long: as the whole corpus would, against
# the 30 minutes of --ddp_timeout on GPUs.
SLOW_TOKENIZING = f"""
import os
if "LOCAL_RANK" in os.environ:
    import sys
    import time
    from datetime import timedelta
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = timedelta(seconds={TIMEOUT})
    sys.path.insert(0, {str(REPO)!r})
    from seqlm.data import token_cache
    build = token_cache._build
    token_cache._build = lambda *args: time.sleep({2 * TIMEOUT}) or build(*args)
"""


def site(folder, code: str) -> str:
    """A folder for PYTHONPATH whose sitecustomize.py, which Python runs at start-up, holds `code`."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(code)
    return str(folder)


def test_the_smallest_memory_and_oldest_capability_are_planned_for():
    a100 = Device("NVIDIA A100-SXM4-80GB", 80 * GB, (8, 0), flash_attention_installed=True, liger_installed=True)
    rtx = Device("NVIDIA GeForce RTX 4090", 24 * GB, (8, 9), flash_attention_installed=True)
    assert common_device([a100, a100]) is a100
    assert common_device([a100, rtx, a100]) == Device("NVIDIA GeForce RTX 4090 / NVIDIA A100-SXM4-80GB", 24 * GB, (8, 0),
                                                      flash_attention_installed=True, liger_installed=False)
    assert common_device([a100, Device("CPU")]) == Device("CPU")
    line = describe_mix([a100, rtx, a100], common_device([a100, rtx, a100]))
    assert line.startswith("the ranks' devices differ (2 x NVIDIA A100-SXM4-80GB (compute capability 8.0, 80.0 GB), "
                           "1 x NVIDIA GeForce RTX 4090 (compute capability 8.9, 24.0 GB)): every rank plans for ")
    assert line.endswith("(compute capability 8.0, 24.0 GB); liger-kernel is installed on 2 of 3 ranks only, so none "
                         "uses it")


@pytest.mark.slow
def test_two_ranks_on_different_cards_take_one_plan_and_train(data, tmp_path):
    """Two CPU ranks through the launcher, each seeing its own stand-in card: both log the plan of the smaller card
    (micro-batch 2 x 4 accumulation steps), rank 0 names the mix, and the run trains to its end."""
    log = pretrain_sh(data, tmp_path / "out", *NARROW_RUN, "--per_device_train_batch_size", "auto",
                      "--gradient_accumulation_steps", "auto", "--global_batch_size", "16", "--max_steps", "2",
                      "--eval_strategy", "no", "--save_strategy", "no", "--sample_steps", "0", "--report_to", "none",
                      "--log_level_replica", "info", ranks=2, PYTHONPATH=site(tmp_path / "site", SITECUSTOMIZE))
    plans = re.findall(r"global batch 16 sequences of 64 tokens = micro-batch .*", log)
    assert plans == 2 * ["global batch 16 sequences of 64 tokens = micro-batch 2 (chosen) x 4 accumulation steps x 2 "
                         "ranks; neither activation checkpointing nor a fused loss (estimated 2.0 GB, within 90% of the "
                         "GPU's 2.4 GB)"], log[-3000:]
    assert log.count("the ranks' devices differ (1 x stand-in card A (compute capability 8.0, 4.0 GB), 1 x stand-in "
                     "card B (compute capability 8.6, 2.4 GB)): every rank plans for the least memory and the oldest "
                     "compute capability among them, stand-in card B / stand-in card A (compute capability 8.0, 2.4 "
                     "GB)") == 1


@pytest.mark.slow
def test_ranks_wait_for_tokenizing_longer_than_the_collective_timeout(data, tmp_path):
    """One rank tokenizes (twice as long as TIMEOUT) while the other waits for the cache, then both train: the wait is
    the cache's file lock, not a barrier that the timeout bounds."""
    log = pretrain_sh(data, tmp_path / "out", *NARROW_RUN, "--token_cache_dir", str(tmp_path / "cache"),
                      "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--sample_steps", "0",
                      "--report_to", "none", ranks=2, PYTHONPATH=site(tmp_path / "site", SLOW_TOKENIZING))
    [seconds] = re.findall(r"tokenized .*train\.jsonl: .* in ([\d.]+) s", log)
    assert float(seconds) > 2 * TIMEOUT
    assert trainer_state(tmp_path / "out")["global_step"] == 2
