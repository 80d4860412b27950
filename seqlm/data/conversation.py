"""What a conversation is: the two JSON Lines schemas it comes in (BelleGroup's `conversations`, OpenAI's
`messages`), parsed and validated line by line, and ChatML, the format it is trained and chatted in:
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, role system, user or assistant, as Qwen's chat models.

The template is ours, not the tokenizer's: the offline Qwen tokenizer is the Qwen3 release, whose template writes an
empty `<think>\\n\\n</think>\\n\\n` into the last assistant turn, a reasoning format this model never learns.
Light on purpose (no torch): make_subset.py validates conversations with it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from seqlm.data.corpus import BadLine, check_encodable, load_object

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# (list key, role key, content key) of the two schemas, and the role names they use
SCHEMAS = (("conversations", "from", "value"), ("messages", "role", "content"))
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# ChatML; a default system prompt, when set, is baked in as `default_system`. Contents are trimmed, as parsing does.
CHATML_TEMPLATE = r"""{%- set default_system = DEFAULT_SYSTEM -%}
{%- for message in messages -%}
{%- if loop.first and message.role != "system" and default_system -%}
{{ "<|im_start|>system\n" + default_system + "<|im_end|>\n" }}
{%- endif -%}
{{ "<|im_start|>" + message.role + "\n" + (message.content | trim) + "<|im_end|>\n" }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ "<|im_start|>assistant\n" }}
{%- endif -%}"""


def is_chat_model(tokenizer) -> bool:
    """A template alone does not make a chat model (Qwen's base tokenizers have one); ending its turns with the eos
    token, the token generation stops at, does."""
    template, eos = tokenizer.chat_template, tokenizer.eos_token
    return bool(template) and eos is not None and eos in template


def chat_template(system_prompt: str | None) -> str:
    """The ChatML template, with `system_prompt` as the system turn of conversations that have none."""
    return CHATML_TEMPLATE.replace("DEFAULT_SYSTEM", json.dumps((system_prompt or "").strip(), ensure_ascii=False))


@dataclass
class Conversation:
    """Chat messages ({"role", "content"}), roles normalised to system/user/assistant, contents stripped, ending
    with an assistant turn."""

    messages: list[dict[str, str]]

    def __len__(self) -> int:  # in characters, like len(text) of a document: what LineStats counts
        return sum(len(m["content"]) for m in self.messages)


def parse_conversation(raw: bytes) -> Conversation:
    """One JSON line of `{"conversations": [{"from": "human"|"assistant", "value"}, ...]}` (BELLE; "gpt" and
    "system" too) or `{"messages": [{"role", "content"}, ...]}`; raise BadLine saying why it is unusable. Turns
    after the last assistant turn are dropped: nothing in them is learned."""
    obj = load_object(raw)
    schema = next((s for s in SCHEMAS if s[0] in obj), None)
    if schema is None:
        raise BadLine("missing_conversations", "no 'conversations' or 'messages' list")
    turns_key, role_key, content_key = schema
    turns = obj[turns_key]
    if not isinstance(turns, list):
        raise BadLine("conversations_not_a_list", type(turns).__name__)
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadLine("turn_not_an_object", type(turn).__name__)
        role = ROLES.get(turn.get(role_key))
        if role is None:
            raise BadLine("unknown_role", repr(turn.get(role_key))[:40])
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise BadLine("content_not_a_string", type(content).__name__)
        content = content.strip()
        if not content:
            raise BadLine("empty_turn", role)
        check_encodable(raw, content)
        messages.append({"role": role, "content": content})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not messages:
        raise BadLine("no_assistant_turn")
    return Conversation(messages)


def prepare_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> None:
    """Make `tokenizer` the fine-tuned model's: the ChatML template and <|im_end|> as eos_token, so that generation
    ends with the assistant's turn. The pad token stays <|endoftext|> (never a label: those are -100)."""
    missing = [t for t in (IM_START, IM_END, END_OF_TEXT) if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"the tokenizer has no {' '.join(missing)}: the ChatML format needs the Qwen tokenizer")
    tokenizer.chat_template = chat_template(system_prompt)
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TEXT


def set_chat_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Generation stops at <|im_end|> (end of turn) or <|endoftext|> (end of document, what pretraining taught).
    Set here, not left to the Trainer's align_special_tokens, so that the saved configs do not depend on it."""
    end_of_turn, end_of_text = tokenizer.convert_tokens_to_ids([IM_END, END_OF_TEXT])
    model.config.eos_token_id = end_of_turn
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [end_of_turn, end_of_text]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
