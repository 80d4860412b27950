#!/usr/bin/env bash
# The real pipeline end to end on a GPU machine, in one command: the GPU twin of demo.sh. Download, cut the subsets,
# tokenize, pretrain Qwen2.5-0.5B, fine-tune it on BELLE conversations, benchmark both, then print how to serve it.
#
#   bash speedrun.sh                 # every step; each prints its time, and the end prints them all
#   bash speedrun.sh                 # again, after any stop: a step whose output is complete is skipped, and a
#                                    # training resumes from its newest complete checkpoint
#   NUM_GPUS=4 SWANLAB_MODE=local bash speedrun.sh     # the launcher's and pretrain.sh's variables pass through
#   SPEEDRUN_DATA=demo PRESET=tiny PRETRAIN_STEPS=200 SFT_STEPS=60 bash speedrun.sh   # a rehearsal, offline, on CPU
#
# A step is complete when its output's own marker says so (python -m seqlm.training.speedrun: the files written
# whole and renamed into place, a subset's line count, a token cache's manifest, a final model at its last step with
# its report, benchmarks.json of the suite).
#   SPEEDRUN_DATA    real (default): the seq-monkey corpus, BELLE train_3.5M_CN, the Qwen2.5-0.5B tokenizer and the
#                    benchmarks' data, downloaded (download_dataset.py); demo: demo.sh's offline sample instead
#   PRESET           model architecture: qwen2.5-0.5b (default), tiny, or a config.json
#   PRETRAIN_LINES   documents to pretrain on (default 1,000,000; demo 1,700); 2,000 more held out (demo 100)
#   SFT_LINES        conversations to fine-tune on (default 100,000; demo 4,000); 1,000 more held out (demo 200)
#   PRETRAIN_STEPS, SFT_STEPS   optimizer steps (default: one epoch of each subset)
#   PRETRAIN_ARGS, SFT_ARGS     more flags for pretrain.sh and finetune.sh, e.g. PRETRAIN_ARGS="--block_size 1024"
#   BENCHMARK_SUITE  what benchmark.py scores (default: default; demo: local, the held-out bits per byte)
#   BENCHMARK_ARGS   more flags for benchmark.py, e.g. "--limit 100" (the first 100 documents of each task)
#   DATA_DIR         data, subsets and token caches (default: data)
#   OUTPUT_ROOT      models: OUTPUT_ROOT/pretrain and OUTPUT_ROOT/sft (default: output)
set -euo pipefail
cd "$(dirname "$0")"

DATA_DIR=${DATA_DIR:-data}
OUTPUT_ROOT=${OUTPUT_ROOT:-output}
PRESET=${PRESET:-qwen2.5-0.5b}
CACHE=$DATA_DIR/token_cache
PRETRAINED=$OUTPUT_ROOT/pretrain
FINETUNED=$OUTPUT_ROOT/sft
case ${SPEEDRUN_DATA:-real} in
    real)
        CORPUS=$DATA_DIR/mobvoi_seq_monkey_general_open_corpus.jsonl.tar.bz2
        CONVERSATIONS=$DATA_DIR/BelleGroup/train_3.5M_CN.json
        TOKENIZER=$DATA_DIR/Qwen2.5-0.5B
        DOWNLOADED=("$CORPUS" "$CONVERSATIONS" "$TOKENIZER/tokenizer.json" "$TOKENIZER/config.json" "$DATA_DIR/eval")
        TRAIN=$DATA_DIR/seq_monkey_1M.jsonl VAL=$DATA_DIR/seq_monkey_val.jsonl VAL_LINES=2000
        SFT_TRAIN=$DATA_DIR/belle_sft.jsonl SFT_VAL=$DATA_DIR/belle_sft_val.jsonl SFT_VAL_LINES=1000
        PRETRAIN_LINES=${PRETRAIN_LINES:-1000000} SFT_LINES=${SFT_LINES:-100000}
        BENCHMARK_SUITE=${BENCHMARK_SUITE:-default} ;;
    demo)
        CORPUS=$DATA_DIR/demo/corpus.jsonl
        CONVERSATIONS=$DATA_DIR/demo/conversations.jsonl
        TOKENIZER=$DATA_DIR/demo/tokenizer
        DOWNLOADED=("$CORPUS" "$CONVERSATIONS" "$TOKENIZER")
        TRAIN=$DATA_DIR/demo/train.jsonl VAL=$DATA_DIR/demo/val.jsonl VAL_LINES=100
        SFT_TRAIN=$DATA_DIR/demo/sft_train.jsonl SFT_VAL=$DATA_DIR/demo/sft_val.jsonl SFT_VAL_LINES=200
        PRETRAIN_LINES=${PRETRAIN_LINES:-1700} SFT_LINES=${SFT_LINES:-4000}
        BENCHMARK_SUITE=${BENCHMARK_SUITE:-local} ;;
    *)
        echo "error: SPEEDRUN_DATA=$SPEEDRUN_DATA: use real (download) or demo (the offline sample)" >&2
        exit 2 ;;
esac

TIMES=()
step() { echo; echo "== $1"; STEP=$1; STARTED=$SECONDS; }
took() {
    TIMES+=("$(printf '%6d s  %s' $((SECONDS - STARTED)) "$STEP")")
    echo "-- $STEP: $((SECONDS - STARTED)) s"
}
complete() { python -m seqlm.training.speedrun "$@"; }  # exits 0, saying so, when the step's output is complete

step "1. data ($SPEEDRUN_DATA)"
if [[ ${SPEEDRUN_DATA:-real} == real ]]; then
    complete written "${DOWNLOADED[@]}" ||
        python download_dataset.py --model --corpus --sft --eval --data-dir "$DATA_DIR"
else
    complete written "${DOWNLOADED[@]}" || python -m seqlm.data.demo "$DATA_DIR/demo"
fi
took

step "2. pretraining subset: $PRETRAIN_LINES documents, $VAL_LINES held out"
complete subset "$TRAIN" "$PRETRAIN_LINES" && complete subset "$VAL" "$VAL_LINES" ||
    python make_subset.py --input "$CORPUS" --lines "$PRETRAIN_LINES" --output "$TRAIN" \
        --val-lines "$VAL_LINES" --val-output "$VAL"
took

step "3. tokenize it once"
complete tokenized "$CACHE" "$PRESET" "$TOKENIZER" "$TRAIN" "$VAL" ||
    python tokenize_corpus.py --config_name "$PRESET" --tokenizer_name "$TOKENIZER" --train_files "$TRAIN" \
        --validation_files "$VAL" --token_cache_dir "$CACHE"
took

step "4. pretrain $PRESET -> $PRETRAINED"
complete trained "$PRETRAINED" ${PRETRAIN_STEPS:-} ||
    PRESET=$PRESET TOKENIZER=$TOKENIZER TRAIN_FILE=$TRAIN VALIDATION_FILE=$VAL OUTPUT_DIR=$PRETRAINED \
    bash pretrain.sh --token_cache_dir "$CACHE" ${PRETRAIN_STEPS:+--max_steps "$PRETRAIN_STEPS"} ${PRETRAIN_ARGS:-}
took

step "5. SFT subset: $SFT_LINES conversations, $SFT_VAL_LINES held out"
complete subset "$SFT_TRAIN" "$SFT_LINES" && complete subset "$SFT_VAL" "$SFT_VAL_LINES" ||
    python make_subset.py --schema sft --input "$CONVERSATIONS" --lines "$SFT_LINES" --output "$SFT_TRAIN" \
        --val-lines "$SFT_VAL_LINES" --val-output "$SFT_VAL"
took

step "6. fine-tune $PRETRAINED -> $FINETUNED"
complete trained "$FINETUNED" ${SFT_STEPS:-} ||
    MODEL=$PRETRAINED TRAIN_FILE=$SFT_TRAIN VALIDATION_FILE=$SFT_VAL OUTPUT_DIR=$FINETUNED \
    bash finetune.sh --token_cache_dir "$CACHE" ${SFT_STEPS:+--max_steps "$SFT_STEPS"} ${SFT_ARGS:-}
took

for model in "$PRETRAINED" "$FINETUNED"; do
    step "7. benchmark $model ($BENCHMARK_SUITE)"
    complete benchmarked "$model/benchmarks" "$BENCHMARK_SUITE" ||
        python benchmark.py --model_path "$model" --suite "$BENCHMARK_SUITE" --heldout_file "$VAL" \
            --eval_data_dir "$DATA_DIR/eval" --token_cache_dir "$CACHE" ${BENCHMARK_ARGS:-}
    took
done

echo
echo "== time per step (a skipped step: the time to find its output complete)"
printf '%s\n' "${TIMES[@]}"
echo
echo "pretrained: $PRETRAINED/   fine-tuned: $FINETUNED/   reports: report.md and benchmarks/benchmarks.md in each"
echo "chat in the terminal:  python chat.py --model_path $FINETUNED"
echo "serve it (an OpenAI-compatible API and a chat page; Ctrl-C stops it):"
echo "python serve.py --model_path $FINETUNED     # then open http://127.0.0.1:8000"
