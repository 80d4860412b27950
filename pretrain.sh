#!/usr/bin/env bash
# Pretrain with DeepSpeed ZeRO-2 on every GPU of this machine (or of a hostfile), or on CPU ranks.
#
#   bash pretrain.sh                                  # Qwen2.5-0.5B from scratch on data/seq_monkey_1M.jsonl
#   NUM_GPUS=4 bash pretrain.sh --learning_rate 3e-4  # any pretrain.py / TrainingArguments flag passes through
#   HOSTFILE=hostfile bash pretrain.sh                # several nodes (seqlm/training/launch.py: NUM_GPUS, HOSTFILE, ...)
#   sbatch pretrain.slurm --learning_rate 3e-4        # on a Slurm cluster (pretrain.slurm runs this script on each node)
#   bash pretrain.sh args.yaml --max_steps 100        # arguments from a .yaml or .json file; flags after it win
#
# What to train on and where to write, passed on only when set: the defaults (`python pretrain.py --help`) live in
# seqlm/training/arguments.py and seqlm/paths.py.
#   PRESET           model architecture (--config_name): qwen2.5-0.5b or tiny (CPU), or a config.json
#   TRAIN_FILE       training corpus (--train_files; make_subset.py writes data/seq_monkey_1M.jsonl)
#   VALIDATION_FILE  held-out corpus (--validation_files)
#   TOKENIZER        tokenizer folder (--tokenizer_name; download_dataset.py fetches data/Qwen2.5-0.5B)
#   OUTPUT_DIR       checkpoints and final model (--output_dir); a rerun resumes from it
#   SWANLAB_MODE     cloud (needs SWANLAB_API_KEY), local (`swanlab watch OUTPUT_DIR/swanlog`), offline, disabled
#   DS_CONFIG        DeepSpeed config (default ds_config_zero2.json: this script is the ZeRO-2 launcher)
set -euo pipefail
cd "$(dirname "$0")"

# A file of arguments comes first, where no flag that takes a list of values (--train_files a b) can swallow it.
ARGS_FILE=()
case ${1:-} in *.yaml | *.yml | *.json) ARGS_FILE=("$1"); shift ;; esac

exec python -m seqlm.training.launch pretrain.py "${ARGS_FILE[@]}" \
    --deepspeed "${DS_CONFIG:-ds_config_zero2.json}" \
    ${PRESET:+--config_name "$PRESET"} \
    ${TOKENIZER:+--tokenizer_name "$TOKENIZER"} \
    ${TRAIN_FILE:+--train_files "$TRAIN_FILE"} \
    ${VALIDATION_FILE:+--validation_files "$VALIDATION_FILE"} \
    ${OUTPUT_DIR:+--output_dir "$OUTPUT_DIR"} \
    "$@"
