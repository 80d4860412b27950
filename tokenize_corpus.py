"""Tokenize corpus files into the token cache ahead of training (e.g. on a CPU box while the GPUs are busy).

pretrain.py does the same on first use and reuses what this wrote; it takes the same arguments:
    python tokenize_corpus.py --train_files data/seq_monkey_1M.jsonl --validation_files data/seq_monkey_val.jsonl
"""
import sys

from transformers import HfArgumentParser

from seqlm.data.token_cache import BlockDataset, build_token_cache
from seqlm.model import load_config_and_tokenizer
from seqlm.training.arguments import DataTrainingArguments, ModelArguments


def main() -> int:
    model_args, data_args = HfArgumentParser((ModelArguments, DataTrainingArguments)).parse_args_into_dataclasses()
    try:
        _, tokenizer, separator_id = load_config_and_tokenizer(model_args, data_args.block_size)
        for source in data_args.train_files + data_args.validation_files:
            folder = build_token_cache(source, tokenizer, separator_id, data_args.token_cache_dir)
            print(f"{source}: {folder} ({len(BlockDataset(folder, data_args.block_size)):,} blocks of "
                  f"{data_args.block_size})")
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
