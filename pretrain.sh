#!/usr/bin/env bash
# Pretrain with DeepSpeed ZeRO-2 on every GPU of this machine (or of a hostfile), or on CPU ranks.
#
#   bash pretrain.sh                                  # Qwen2.5-0.5B from scratch on data/seq_monkey_1M.jsonl
#   NUM_GPUS=4 bash pretrain.sh --learning_rate 3e-4  # any pretrain.py / TrainingArguments flag passes through
#   HOSTFILE=hostfile bash pretrain.sh                # several nodes (DeepSpeed hostfile: "host slots=8" lines)
#
# Environment knobs (the training defaults themselves live in seqlm/arguments.py):
#   PRESET           model architecture: qwen2.5-0.5b (default) or tiny (CPU), or a config.json
#   TRAIN_FILE       training corpus (default data/seq_monkey_1M.jsonl)
#   VALIDATION_FILE  held-out corpus (default data/seq_monkey_val.jsonl)
#   TOKENIZER        tokenizer folder (default data/Qwen2.5-0.5B, from download_dataset.py)
#   OUTPUT_DIR       checkpoints and final model (default output/pretrain); a rerun resumes from it
#   NUM_GPUS         ranks on this machine (default: all GPUs, or 1 CPU rank)
#   HOSTFILE         DeepSpeed hostfile for multi-node runs
#   MASTER_PORT      rendezvous port (default 29500)
#   SWANLAB_MODE     cloud (needs SWANLAB_API_KEY), local (default; `swanlab watch OUTPUT_DIR/swanlog`), offline, disabled
#   DS_CONFIG        DeepSpeed config (default ds_config_zero2.json)
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${PRESET:-qwen2.5-0.5b}
TRAIN_FILE=${TRAIN_FILE:-data/seq_monkey_1M.jsonl}
VALIDATION_FILE=${VALIDATION_FILE:-data/seq_monkey_val.jsonl}
TOKENIZER=${TOKENIZER:-data/Qwen2.5-0.5B}
OUTPUT_DIR=${OUTPUT_DIR:-output/pretrain}
DS_CONFIG=${DS_CONFIG:-ds_config_zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
    DEVICE_ARGS=(--bf16 true)
else
    # CPU ranks: gloo backend, fp32; the launcher leaves OMP_NUM_THREADS unset, so share the cores out here.
    NUM_GPUS=${NUM_GPUS:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NUM_GPUS > 0 ? $(nproc) / NUM_GPUS : 1 ))}
    # Every step allocates and frees logits of block x 151,936 floats; by default glibc hands such blocks back to
    # the kernel each time, and re-faulting their pages costs more than the math (measured 2.5x per step).
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
    DEVICE_ARGS=(--use_cpu true)
fi

if [[ -n ${HOSTFILE:-} ]]; then
    LAUNCHER=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
else
    LAUNCHER=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
fi

set -x
"${LAUNCHER[@]}" pretrain.py \
    --deepspeed "$DS_CONFIG" \
    --config_name "$PRESET" \
    --tokenizer_name "$TOKENIZER" \
    --train_files "$TRAIN_FILE" \
    --validation_files "$VALIDATION_FILE" \
    --output_dir "$OUTPUT_DIR" \
    "${DEVICE_ARGS[@]}" \
    "$@"
