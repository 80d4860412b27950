"""Default locations: where download_dataset.py puts files is where make_subset.py and pretrain.sh look."""
from pathlib import Path

DATA_DIR = Path("data")
MODEL_DIR = DATA_DIR / "Qwen2.5-0.5B"  # config + tokenizer files of the hub model
CORPUS_ARCHIVE = DATA_DIR / "mobvoi_seq_monkey_general_open_corpus.jsonl.tar.bz2"
SFT_FILE = DATA_DIR / "BelleGroup" / "train_3.5M_CN.json"
EVAL_DATA_DIR = DATA_DIR / "eval"  # benchmark task data, one folder per hub dataset repo (download_dataset.py --eval)
TRAIN_SUBSET = DATA_DIR / "seq_monkey_1M.jsonl"
VALIDATION_SUBSET = DATA_DIR / "seq_monkey_val.jsonl"
TOKEN_CACHE_DIR = DATA_DIR / "token_cache"
REPO = Path(__file__).resolve().parent.parent  # this checkout: its configs, prompts and launch scripts
CONFIGS_DIR = REPO / "configs"
PRETRAIN_OUTPUT = Path("output") / "pretrain"  # what pretrain.sh writes and finetune.sh starts from
SFT_OUTPUT = Path("output") / "sft"  # what finetune.sh writes; chat.py and serve.py start from it
SFT_SUBSET = DATA_DIR / "belle_sft.jsonl"  # make_subset.py --schema sft: conversations to fine-tune on
SFT_VALIDATION_SUBSET = DATA_DIR / "belle_sft_val.jsonl"
