#!/usr/bin/env bash
# Fine-tune (SFT) with DeepSpeed ZeRO-2 on every GPU of this machine (or of a hostfile) or on CPU ranks, as pretrain.sh.
#
#   python make_subset.py --schema sft                # once: data/belle_sft.jsonl, 100,000 conversations of BELLE
#   bash finetune.sh                                  # output/pretrain on data/belle_sft.jsonl -> output/sft
#   TRAIN_FILE=data/BelleGroup/train_3.5M_CN.json bash finetune.sh   # on all 3.5M conversations instead
#   NUM_GPUS=4 bash finetune.sh --learning_rate 1e-5  # any finetune.py / TrainingArguments flag passes through
#   bash finetune.sh args.yaml --max_steps 100        # arguments from a .yaml or .json file; flags after it win
#
# What to train and where to write, passed on only when set: the defaults (`python finetune.py --help`) live in
# seqlm/training/arguments.py and seqlm/paths.py.
#   MODEL            model to fine-tune (--model_name_or_path): a checkpoint folder or hub id; by default what
#                    pretrain.sh wrote
#   TRAIN_FILE       conversations, BELLE or `messages` JSON Lines (--train_files; default data/belle_sft.jsonl)
#   VALIDATION_FILE  held-out conversations (default none); evaluated every --eval_steps and at the end
#   SYSTEM_PROMPT    system turn for conversations without one, saved in the chat template (default none)
#   OUTPUT_DIR       checkpoints and final model (--output_dir); a rerun resumes from it
#   SWANLAB_MODE     cloud (needs SWANLAB_API_KEY), local (`swanlab watch OUTPUT_DIR/swanlog`), offline, disabled
#   DS_CONFIG        DeepSpeed config (default ds_config_zero2.json)
#   NUM_GPUS, HOSTFILE, MASTER_PORT: see seqlm/training/launch.py; on Slurm: sbatch finetune.slurm
set -euo pipefail
cd "$(dirname "$0")"

# A file of arguments comes first, where no flag that takes a list of values (--train_files a b) can swallow it.
ARGS_FILE=()
case ${1:-} in *.yaml | *.yml | *.json) ARGS_FILE=("$1"); shift ;; esac

exec python -m seqlm.training.launch finetune.py "${ARGS_FILE[@]}" \
    --deepspeed "${DS_CONFIG:-ds_config_zero2.json}" \
    ${MODEL:+--model_name_or_path "$MODEL"} \
    ${TRAIN_FILE:+--train_files "$TRAIN_FILE"} \
    ${VALIDATION_FILE:+--validation_files "$VALIDATION_FILE" --eval_strategy steps} \
    ${SYSTEM_PROMPT:+--system_prompt "$SYSTEM_PROMPT"} \
    ${OUTPUT_DIR:+--output_dir "$OUTPUT_DIR"} \
    "$@"
