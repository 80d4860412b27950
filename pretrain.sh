#!/usr/bin/env bash
# Pretrain with DeepSpeed ZeRO-2 on every GPU of this machine (or of a hostfile), or on CPU ranks.
#
#   bash pretrain.sh                                  # Qwen2.5-0.5B from scratch on data/seq_monkey_1M.jsonl
#   NUM_GPUS=4 bash pretrain.sh --learning_rate 3e-4  # any pretrain.py / TrainingArguments flag passes through
#   HOSTFILE=hostfile bash pretrain.sh                # several nodes (see launch.sh for NUM_GPUS, HOSTFILE, MASTER_PORT)
#
# What to train on and where to write (the training defaults themselves live in seqlm/arguments.py):
#   PRESET           model architecture: qwen2.5-0.5b (default) or tiny (CPU), or a config.json
#   TRAIN_FILE       training corpus (default data/seq_monkey_1M.jsonl, from make_subset.py)
#   VALIDATION_FILE  held-out corpus (default data/seq_monkey_val.jsonl)
#   TOKENIZER        tokenizer folder (default data/Qwen2.5-0.5B, from download_dataset.py)
#   OUTPUT_DIR       checkpoints and final model (default output/pretrain); a rerun resumes from it
#   SWANLAB_MODE     cloud (needs SWANLAB_API_KEY), local (`swanlab watch OUTPUT_DIR/swanlog`), offline, disabled
#   DS_CONFIG        DeepSpeed config (default ds_config_zero2.json)
set -euo pipefail
cd "$(dirname "$0")"

exec bash launch.sh pretrain.py \
    --deepspeed "${DS_CONFIG:-ds_config_zero2.json}" \
    --config_name "${PRESET:-qwen2.5-0.5b}" \
    --tokenizer_name "${TOKENIZER:-data/Qwen2.5-0.5B}" \
    --train_files "${TRAIN_FILE:-data/seq_monkey_1M.jsonl}" \
    --validation_files "${VALIDATION_FILE:-data/seq_monkey_val.jsonl}" \
    --output_dir "${OUTPUT_DIR:-output/pretrain}" \
    "$@"
