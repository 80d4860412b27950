#!/usr/bin/env bash
# Run a training script (pretrain.py, finetune.py) under the DeepSpeed launcher on every GPU of this machine, on
# the nodes of a hostfile, or on CPU ranks: `bash launch.sh SCRIPT.py ARGS...`. pretrain.sh and finetune.sh call it.
#   NUM_GPUS     ranks on this machine (default: all GPUs, or 1 CPU rank)
#   HOSTFILE     DeepSpeed hostfile for several nodes ("node1 slots=8" lines)
#   MASTER_PORT  rendezvous port (default 29500)
set -euo pipefail
cd "$(dirname "$0")"
MASTER_PORT=${MASTER_PORT:-29500}

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
    DEVICE_ARGS=(--bf16 true)
else
    # CPU ranks: gloo backend, fp32; the launcher leaves OMP_NUM_THREADS unset, so share the cores out here.
    NUM_GPUS=${NUM_GPUS:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NUM_GPUS > 0 ? $(nproc) / NUM_GPUS : 1 ))}
    # Every step allocates and frees logits of block x 151,936 floats; by default glibc hands such blocks back to
    # the kernel each time, and re-faulting their pages costs more than the math (measured 2.5x per step for the
    # tiny preset). For the 0.5B preset on CPU it costs memory instead (peak 16.1 vs 12.2 GB): set both to 131072.
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
    DEVICE_ARGS=(--use_cpu true)
    # DeepSpeed's CPU all-reduce leaves a 69 MB shared-memory buffer per rank and port in /dev/shm, which is RAM:
    # dozens of runs filled 11 GB of a 24 GB machine. Remove this run's when it ends, however it ends.
    trap '{ set +x; } 2>/dev/null; rm -f /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*_"$MASTER_PORT"_*' EXIT
fi

if [[ -n ${HOSTFILE:-} ]]; then
    LAUNCHER=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
else
    LAUNCHER=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
fi

# A token among the arguments would be printed by the launcher and visible in `ps` on every node: huggingface_hub
# reads it from the environment instead.
SCRIPT_ARGS=()
for ((i = 2; i <= $#; i++)); do
    case ${!i} in
        --hub_token) ((i++)); export HF_TOKEN=${!i} ;;
        --hub_token=*) export HF_TOKEN=${!i#*=} ;;
        *) SCRIPT_ARGS+=("${!i}") ;;
    esac
done

set -x
"${LAUNCHER[@]}" "$1" "${DEVICE_ARGS[@]}" "${SCRIPT_ARGS[@]}"  # device flags first: the caller's flags win
