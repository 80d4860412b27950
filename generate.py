"""Continue prompts with a pretrained checkpoint, loaded by stock transformers (nothing of this repo is needed).

    python generate.py --model_path output/pretrain --prompt "中国的首都是" --prompt "今天天气"
"""
import argparse

import torch
from transformers import pipeline, set_seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="output/pretrain", help="HF checkpoint folder (default: %(default)s)")
    p.add_argument("--prompt", action="append", help="a prompt to continue; repeat for several (default: a few Chinese openings)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--repetition_penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    set_seed(args.seed)
    generator = pipeline("text-generation", model=args.model_path,
                         dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    sampling = {} if args.greedy else dict(temperature=args.temperature, top_p=args.top_p)
    for prompt in args.prompt or ["中国的首都是", "今天天气很好，", "人工智能的发展"]:
        out = generator(prompt, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                        repetition_penalty=args.repetition_penalty, **sampling)
        print(f"{prompt} → {out[0]['generated_text'][len(prompt):]}\n")


if __name__ == "__main__":
    main()
