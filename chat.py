"""Chat in the terminal with a fine-tuned checkpoint, answers printed as they are generated; or continue text with a
pretrained one. Any Hugging Face causal LM checkpoint works (loaded with stock transformers).

    python chat.py                                  # output/sft, interactive: /reset starts over, /exit quits
    python chat.py --prompt "请介绍一下长城。"        # one answer, then exit: for scripts
    python chat.py --model_path output/pretrain     # a pretrained checkpoint continues what you type instead

A checkpoint chats when its tokenizer has a chat template that ends turns with its eos token: what finetune.py saves
(and what chat models such as Qwen2.5-Instruct ship). Otherwise, or with --plain, each input is continued as text.
Its prompts are in Chinese when the locale is (LC_ALL, LC_MESSAGES or LANG zh_*), as the chat page follows the browser.
"""
import argparse
import os
import sys

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TextStreamer,
    set_seed,
)

from seqlm import paths
from seqlm.data.conversation import is_chat_model
from seqlm.model import inference_device, inference_dtype
from seqlm.model_folder import check_model_folder, check_tokenizer_fits

Message = dict[str, str]
# What the terminal shows around the conversation, in the user's language (as the chat page speaks the browser's).
TEXTS = {
    "en": {"you": "you> ", "model": "model> ", "chat": "chat; /reset starts over, /exit quits",
           "text": "no chat template, so each input is continued as text; /exit quits",
           "cleared": "(conversation cleared)", "interrupted": "(interrupted; that message is forgotten)"},
    "zh": {"you": "你> ", "model": "模型> ", "chat": "对话；/reset 重新开始，/exit 退出",
           "text": "没有对话模板，输入的每段文字都会被续写；/exit 退出",
           "cleared": "（对话已清空）", "interrupted": "（已中断；这条消息不计入对话）"},
}


def language() -> str:
    """"zh" when the user's locale is Chinese (zh, zh_CN.UTF-8, zh_TW, ...), else "en": the first of LC_ALL,
    LC_MESSAGES and LANG that is set, the order in which gettext reads them."""
    locale = next((os.environ[k] for k in ("LC_ALL", "LC_MESSAGES", "LANG") if os.environ.get(k)), "")
    return "zh" if locale.lower().startswith("zh") else "en"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=str(paths.SFT_OUTPUT),
                   help="checkpoint folder or hub id (default: %(default)s)")
    p.add_argument("--prompt", help="answer this one message (or continue this text), print the answer and exit")
    p.add_argument("--system", help="system prompt (default: the one the model was fine-tuned with, if any)")
    p.add_argument("--plain", action="store_true", help="continue text even if the checkpoint has a chat template")
    p.add_argument("--max_new_tokens", type=int, default=512, help="longest answer, in tokens (default: %(default)s)")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token instead of sampling")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold (default: %(default)s)")
    p.add_argument("--repetition_penalty", type=float, default=1.1,
                   help="above 1 discourages repeats (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    return p.parse_args()


def load(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer; ModelFolderError, OSError or ValueError, with a one-line message, if unusable."""
    check_model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = inference_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=inference_dtype(device, path))
    check_tokenizer_fits(path, tokenizer, model.config.vocab_size)
    return model.to(device).eval(), tokenizer


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message] | str, limit: int) -> torch.Tensor:
    """The prompt's ids, at most `limit` of them: a conversation loses its oldest exchanges first (the system turn
    stays), then, as a text does, its beginning."""
    if isinstance(messages, str):
        ids = tokenizer(messages, return_tensors="pt")["input_ids"]
    else:
        system, turns = (messages[:1], messages[1:]) if messages[0]["role"] == "system" else ([], messages)
        while True:
            ids = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")["input_ids"]
            if ids.shape[1] <= limit or len(turns) <= 1:
                break
            turns = turns[2:]  # the oldest user message and its answer
    return ids[:, -limit:]


def respond(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[Message] | str,
            args: argparse.Namespace, stop_ids: list[int]) -> str:
    """Generate an answer to `prompt`, printing it as it comes; return it."""
    limit = max(1, model.config.max_position_embeddings - args.max_new_tokens)
    ids = prompt_ids(tokenizer, prompt, limit).to(model.device)
    sampling = {"do_sample": False} if args.greedy else {"do_sample": True, "temperature": args.temperature,
                                                          "top_p": args.top_p}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         repetition_penalty=args.repetition_penalty, eos_token_id=stop_ids,
                         pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> int:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()  # the terminal is for the conversation
    try:
        model, tokenizer = load(args.model_path)
    except (OSError, ValueError) as e:  # ModelFolderError is a ValueError
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    chat = is_chat_model(tokenizer) and not args.plain
    eos = model.generation_config.eos_token_id
    stop_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                       *([tokenizer.eos_token_id] if chat else [])})
    if args.system and not chat:
        print("note: --system is ignored: this checkpoint continues text (no chat template)", file=sys.stderr)
    set_seed(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system and chat else []

    if args.prompt is not None:
        respond(model, tokenizer, system + [{"role": "user", "content": args.prompt}] if chat else args.prompt,
                args, stop_ids)
        return 0

    texts = TEXTS[language()]
    print(f"{args.model_path}: " + texts["chat" if chat else "text"])
    history: list[Message] = list(system)
    while True:
        try:
            text = input("\n" + texts["you"]).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(system)
            print(texts["cleared"])
            continue
        if not text:
            continue
        print(texts["model"], end="", flush=True)
        try:
            if chat:
                answer = respond(model, tokenizer, history + [{"role": "user", "content": text}], args, stop_ids)
                history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            else:
                respond(model, tokenizer, text, args, stop_ids)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n" + texts["interrupted"])


if __name__ == "__main__":
    sys.exit(main())
