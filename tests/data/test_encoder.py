"""seqlm.data.encoder: tiktoken's BPE must give the ids the real Qwen tokenizer (HF tokenizers) gives, on everything.

The reference is always the HF tokenizer itself, called here on the same text."""
import random
import unicodedata

import pytest
from helpers import add_a_prefix_token, reshaped
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seqlm.data.encoder import Encoder, tiktoken_twin

SNIPPET = "a{c}b {c}{c}1{c} 中{c}\n{c}  {c}'s{c}\r\n"  # a code point next to letters, digits, spaces and itself


@pytest.fixture(scope="module")
def twin(offline_qwen_tokenizer):
    twin = tiktoken_twin(offline_qwen_tokenizer)
    assert twin is not None
    return twin


def hf_ids(tokenizer, texts):
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def assert_same_ids(tokenizer, twin, texts):
    assert all(unicodedata.is_normalized("NFC", t) for t in texts)
    expected = hf_ids(tokenizer, texts)
    got = twin.encode_batch(texts, allowed_special="all")
    mismatches = [t for t, a, b in zip(texts, expected, got) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[0]!r}"


def test_every_code_point(offline_qwen_tokenizer, twin):
    """Both engines' Unicode tables (letters, numbers, spaces) and byte-level BPE on every code point, the
    unassigned ones too; those the snippet would make non-NFC go through the HF tokenizer, tested below."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    pieces = [p for p in (SNIPPET.format(c=c) for c in chars) if unicodedata.is_normalized("NFC", p)]
    assert len(pieces) > 1_100_000
    texts = ["".join(pieces[i:i + 64]) for i in range(0, len(pieces), 64)]
    assert_same_ids(offline_qwen_tokenizer, twin, [t for t in texts if unicodedata.is_normalized("NFC", t)])


def test_runs_of_vocabulary_tokens(offline_qwen_tokenizer, twin):
    """Where the two BPE algorithms could part: strings made of whole tokens, in every order."""
    rng = random.Random(0)
    tokens = [s for s in offline_qwen_tokenizer.convert_ids_to_tokens(range(151643))]
    strings = [offline_qwen_tokenizer.convert_tokens_to_string([t]) for t in tokens]
    strings = [s for s in strings if s and "\ufffd" not in s]
    texts = ["".join(rng.choices(strings, k=rng.randint(1, 40))) for _ in range(30_000)]
    assert_same_ids(offline_qwen_tokenizer, twin, [t for t in texts if unicodedata.is_normalized("NFC", t)])


def test_spaces_digits_newlines_and_special_tokens(offline_qwen_tokenizer, twin):
    rng = random.Random(1)
    parts = [" ", "  ", "\n", "\r\n", "\t", "\u3000", "\xa0", "a", "中", "1", "23", "'s", "'LL", "!!", "x y",
             "<|endoftext|>", "<|im_start|>", "<tool_call>", "</think>", "<|endoftext", "<|", "|>"]
    texts = ["".join(rng.choices(parts, k=rng.randint(1, 40))) for _ in range(30_000)]
    assert_same_ids(offline_qwen_tokenizer, twin, texts)
    assert twin.encode("<|endoftext|>", allowed_special="all") == [151643]


def test_long_pieces(offline_qwen_tokenizer, twin):
    """Runs the pre-tokenizer cannot split (no space or punctuation): one BPE piece of up to 150,000 bytes."""
    rng = random.Random(2)
    texts = ["a" * 100_000, "".join(rng.choices("abcdefghij", k=50_000)),
             "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(50_000))]
    assert_same_ids(offline_qwen_tokenizer, twin, texts)


def test_real_text(offline_qwen_tokenizer, twin, peoples_daily_texts):
    assert_same_ids(offline_qwen_tokenizer, twin, peoples_daily_texts)


# ---------------------------------------------------------------- the Encoder


CHANGED_BY_NFC = ["cafe\u0301", "\u1100\u1161\u11a8 한", "A\u030a"]
# Not NFC as a whole, but the HF tokenizer normalizes only between added tokens: this one it leaves as it is.
NOT_NFC = CHANGED_BY_NFC + ["<|endoftext|>\u0338 x"]


@pytest.mark.parametrize("threads", [1, 3])
def test_encoder_gives_the_tokenizers_ids(offline_qwen_tokenizer, twin, peoples_daily_texts, threads):
    texts = peoples_daily_texts[:200] + NOT_NFC + ["", " ", "<|im_end|>"]
    encode = Encoder(offline_qwen_tokenizer, threads=threads)
    assert encode.name == "tiktoken"
    assert [list(ids) for ids in encode(texts)] == hf_ids(offline_qwen_tokenizer, texts)
    # Why text that is not NFC must go through the HF tokenizer: the HF normalizer changes it, tiktoken does not.
    assert all(twin.encode(t, allowed_special="all") != ids
               for t, ids in zip(CHANGED_BY_NFC, hf_ids(offline_qwen_tokenizer, CHANGED_BY_NFC)))


def swap_two_merges(spec):
    merges = spec["model"]["merges"]
    merges[1000], merges[1001] = merges[1001], merges[1000]


@pytest.mark.parametrize("change", [
    lambda s: s.update(normalizer={"type": "NFKC"}),
    lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+"),
    lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True),
    lambda s: s.update(pre_tokenizer=None),
    lambda s: s["model"].update(byte_fallback=True),
    swap_two_merges,
    lambda s: s["added_tokens"][0].update(lstrip=True),
    add_a_prefix_token,
], ids=["nfkc", "other-pattern", "prefix-space", "no-pre-tokenizer", "byte-fallback", "merge-order", "lstrip",
        "prefix-added-token"])
def test_other_shapes_use_the_hf_tokenizer(offline_qwen_tokenizer, change):
    other = reshaped(offline_qwen_tokenizer, change)
    encode = Encoder(other)
    assert encode.twin is None and encode.name == "tokenizers"
    texts = ["天气很好, the weather is fine 123", "<|endoftext|><zz>x"]
    assert encode(texts) == hf_ids(other, texts)


def test_unchanged_copy_is_still_a_twin(offline_qwen_tokenizer):
    """The reshaping above is not what turns the twin off."""
    assert tiktoken_twin(reshaped(offline_qwen_tokenizer, lambda s: None)) is not None


def test_a_tokenizer_of_another_kind_uses_the_hf_tokenizer():
    wordlevel = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wordlevel)
    assert tiktoken_twin(tok) is None
    assert Encoder(tok)(["hello world", "hello there"]) == [[1, 2], [1, 0]]
