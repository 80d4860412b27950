"""Gradient accumulation in bf16 against fp32, under DeepSpeed ZeRO-2 on CPU ranks: the gradient DeepSpeed holds after
--micro_steps micro-batches (what the optimizer step would take), against the fp64 sum of the same micro-batches'
bf16 gradients, computed apart by a copy of the model without DeepSpeed. The error is the accumulation's alone.

    python -m bench.grad_accum                       # the shipped ds_config_zero2.json, then without data_types
    python -m bench.grad_accum --ranks 1 --micro_steps 8 --only shipped   # what tests/training/test_memory.py runs

Each rank prints nothing; the first prints one line a config: `CONFIG relative error E (max M)`, E the L2 norm of the
difference over that of the reference, M the largest elementwise difference over the reference's largest value.
"""
import argparse
import copy
import json
import os
import sys

import torch
import torch.multiprocessing as mp

from seqlm.data.demo import free_port
from seqlm.model import load_config
from seqlm.paths import REPO

SHIPPED = REPO / "ds_config_zero2.json"


def configs(only: str | None) -> dict[str, dict]:
    shipped = json.loads(SHIPPED.read_text())
    without = {k: v for k, v in shipped.items() if k != "data_types"}  # DeepSpeed's default: the model's dtype
    return {name: c for name, c in (("shipped", shipped), ("bf16-accumulation", without)) if only in (None, name)}


def rank_main(rank: int, world: int, port: int, micro_steps: int, ds_configs: dict, seed: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = load_config("tiny", "vocab_size=4096")  # small logits: the time goes to the layers whose gradients sum
    for name, ds_config in ds_configs.items():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        ds_config = {**ds_config, "bf16": {"enabled": True}, "fp16": {"enabled": False},
                     "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": micro_steps,
                     "train_batch_size": micro_steps * world, "gradient_clipping": 0.0}
        ds_config["zero_optimization"] = {**ds_config["zero_optimization"], "reduce_bucket_size": 500_000}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        twin = copy.deepcopy(engine.module)  # the same bf16 weights, outside DeepSpeed
        reference = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in twin.named_parameters()}
        generator = torch.Generator().manual_seed(seed + 1)
        for micro_step in range(micro_steps):
            # every rank draws every rank's batch, so that each can add all of them to the reference
            batches = [torch.randint(0, config.vocab_size, (1, 64), generator=generator) for _ in range(world)]
            for ids in batches:
                twin.zero_grad()
                (twin(input_ids=ids, labels=ids).loss / micro_steps).backward()  # as DeepSpeed scales it
                for n, p in twin.named_parameters():
                    reference[n] += p.grad.double() / world
            loss = engine(input_ids=batches[rank], labels=batches[rank]).loss
            engine.backward(loss)
            if micro_step < micro_steps - 1:
                engine.step()  # as the Trainer calls it: DeepSpeed only counts the micro-step
        accumulated = {n: safe_get_full_grad(p).double() for n, p in engine.module.named_parameters()}
        if rank == 0:
            difference = torch.cat([(accumulated[n] - reference[n]).flatten() for n in reference])
            expected = torch.cat([r.flatten() for r in reference.values()])
            print(f"{name} relative error {(difference.norm() / expected.norm()).item():.3e} "
                  f"(max {(difference.abs().max() / expected.abs().max()).item():.3e})", flush=True)
        engine.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--micro_steps", type=int, default=32)
    p.add_argument("--only", choices=["shipped", "bf16-accumulation"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    mp.spawn(rank_main, args=(args.ranks, free_port(), args.micro_steps, configs(args.only), args.seed),
             nprocs=args.ranks)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
