"""launch.sh on the machines users share and spread over: the GPUs CUDA_VISIBLE_DEVICES names, and the environment
a run needs on every node. The GPU choice is read from what DeepSpeed's own runner resolves (its launcher logs the
world it was given, and the CUDA_VISIBLE_DEVICES it sets for the ranks), with a stand-in `nvidia-smi` that lists
four GPUs; the ranks then stop at --help, as this machine has no GPU to train on."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

FOUR_GPUS = """#!/bin/sh
[ "$1" = -L ] || exit 9
for i in 0 1 2 3; do echo "GPU $i: NVIDIA A100-SXM4-80GB (UUID: GPU-$i$i$i$i$i$i$i$i-aaaa-bbbb-cccc-dddddddddddd)"; done
"""


@pytest.fixture
def four_gpu_machine(tmp_path):
    """An environment whose `nvidia-smi -L` lists four GPUs; LOCAL_SIZE is DeepSpeed's own device count for its CPU
    accelerator, which the runner asks in place of CUDA's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FOUR_GPUS)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "LOCAL_SIZE": "4"}
    for name in "NUM_GPUS", "HOSTFILE", "NODE_RANK", "CUDA_VISIBLE_DEVICES":
        env.pop(name, None)
    return env


def launch(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), "--help"], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, visible, num_gpus, used", [
    ("pretrain.sh", "2,3", None, [2, 3]),
    ("finetune.sh", "3,1,2", "1", [3]),  # NUM_GPUS counts within CUDA_VISIBLE_DEVICES, in its order
])
def test_the_gpus_cuda_visible_devices_names_are_the_ones_deepspeed_launches_on(four_gpu_machine, script, visible,
                                                                               num_gpus, used):
    env = {**four_gpu_machine, "CUDA_VISIBLE_DEVICES": visible, **({"NUM_GPUS": num_gpus} if num_gpus else {})}
    result = launch(script, env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert f"WORLD INFO DICT: {{'localhost': {used}}}" in out  # DeepSpeed's launcher, from its runner
    assert f"Setting CUDA_VISIBLE_DEVICES={','.join(map(str, used))}" in out
    assert "ignoring it" not in out
    assert [line for line in out.splitlines() if line.startswith("training on GPU")] == \
        [f"training on GPU {gpu}: NVIDIA A100-SXM4-80GB" for gpu in used]


@pytest.mark.parametrize("visible, num_gpus, says", [
    ("2,3", "3", "NUM_GPUS=3 but CUDA_VISIBLE_DEVICES=2,3 names 2 GPU(s): NUM_GPUS counts within it"),
    ("GPU-2222", None, "CUDA_VISIBLE_DEVICES=GPU-2222: DeepSpeed's launcher takes GPU indices only"),
])
def test_a_gpu_choice_deepspeed_cannot_honour_stops_in_one_line_before_launching(four_gpu_machine, visible, num_gpus,
                                                                                 says):
    env = {**four_gpu_machine, "CUDA_VISIBLE_DEVICES": visible, **({"NUM_GPUS": num_gpus} if num_gpus else {})}
    result = launch("pretrain.sh", env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert "deepspeed" not in result.stdout + result.stderr.split("error:")[0]
