"""chat.py on tiny checkpoints saved the way pretrain.sh and finetune.sh save theirs (random weights: what is tested
is the plumbing, not the answers): chat or plain continuation, history, /reset, one-shot mode, and one-line errors
for checkpoints it cannot use. chat.py on a trained SFT checkpoint is in test_sft.py."""
import io
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig

import chat
from seqlm.data.conversation import prepare_chat_tokenizer, set_chat_eos
from seqlm.model import load_config
from seqlm.tokenizer import offline_tokenizer_dir


@pytest.fixture(scope="module")
def checkpoints(module_tmp):
    root = module_tmp("checkpoints")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(str(offline_tokenizer_dir()))
    tokenizer.eos_token = "<|endoftext|>"  # as pretrain.sh saves it
    model.save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    prepare_chat_tokenizer(tokenizer, "你是一个助手。")  # as finetune.sh saves it
    set_chat_eos(model, tokenizer)
    model.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    return root


def run(monkeypatch, capsys, *args: str, stdin: str = "", locale: dict | None = None) -> tuple[int, str, str]:
    """chat.main() on `args`, reading `stdin`, in the `locale` given (LC_ALL, LC_MESSAGES, LANG; default: English)."""
    for key in ("LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (locale or {"LANG": "C.UTF-8"}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["chat.py", "--max_new_tokens", "4", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = chat.main()
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def prompts(monkeypatch):
    """Every prompt chat.py generates from, in order (generation itself still runs)."""
    seen = []
    respond = chat.respond

    def spy(model, tokenizer, prompt, *args):
        seen.append(prompt)
        return respond(model, tokenizer, prompt, *args)

    monkeypatch.setattr(chat, "respond", spy)
    return seen


def test_fine_tuned_checkpoints_chat_and_pretrained_ones_continue(checkpoints):
    assert chat.is_chat_model(AutoTokenizer.from_pretrained(checkpoints / "sft"))
    # The pretrained tokenizer has a template too (Qwen3's), but it does not end turns with the eos token.
    pretrained = AutoTokenizer.from_pretrained(checkpoints / "pretrained")
    assert pretrained.chat_template and not chat.is_chat_model(pretrained)


def test_one_shot_answer(checkpoints, monkeypatch, capsys, prompts):
    code, out, _ = run(monkeypatch, capsys, "--model_path", str(checkpoints / "sft"), "--prompt", "你好", "--greedy")
    assert code == 0 and out.endswith("\n")
    assert prompts == [[{"role": "user", "content": "你好"}]]


def test_one_shot_continuation_of_a_pretrained_checkpoint(checkpoints, monkeypatch, capsys, prompts):
    code, out, err = run(monkeypatch, capsys, "--model_path", str(checkpoints / "pretrained"), "--prompt", "中国的首都",
                         "--system", "ignored")
    assert code == 0 and out.strip()
    assert prompts == ["中国的首都"] and "--system is ignored" in err


def test_plain_forces_continuation(checkpoints, monkeypatch, capsys, prompts):
    assert run(monkeypatch, capsys, "--model_path", str(checkpoints / "sft"), "--prompt", "今天", "--plain")[0] == 0
    assert prompts == ["今天"]


def test_interactive_chat_keeps_the_history_until_reset(checkpoints, monkeypatch, capsys, prompts):
    code, out, _ = run(monkeypatch, capsys, "--model_path", str(checkpoints / "sft"), "--system", "简短回答。",
                       stdin="你好\n\n再说一次\n/reset\n新话题\n/exit\nnever read\n")
    assert code == 0 and "(conversation cleared)" in out
    system = {"role": "system", "content": "简短回答。"}
    assert [[m["content"] for m in p] for p in prompts] == [
        [system["content"], "你好"],
        [system["content"], "你好", prompts[1][2]["content"], "再说一次"],  # the first answer is in the history
        [system["content"], "新话题"]]
    assert prompts[1][2]["role"] == "assistant"


@pytest.mark.parametrize("locale, chinese", [({"LANG": "zh_CN.UTF-8"}, True), ({"LANG": "zh_TW"}, True),
                                             ({"LANG": "en_US.UTF-8"}, False), ({"LC_ALL": "zh_CN.UTF-8"}, True),
                                             ({"LC_MESSAGES": "zh_CN.UTF-8", "LANG": "en_US.UTF-8"}, True),
                                             ({"LC_ALL": "C", "LANG": "zh_CN.UTF-8"}, False)])
def test_the_terminal_speaks_the_users_language(checkpoints, monkeypatch, capsys, locale, chinese):
    """As the chat page speaks the browser's: Chinese for a zh locale (LC_ALL, then LC_MESSAGES, then LANG)."""
    code, out, _ = run(monkeypatch, capsys, "--model_path", str(checkpoints / "sft"), stdin="你好\n/reset\n/exit\n",
                       locale=locale)
    words = ["对话；/reset 重新开始，/exit 退出", "\n你> ", "模型> ", "（对话已清空）"] if chinese else \
        ["chat; /reset starts over, /exit quits", "\nyou> ", "model> ", "(conversation cleared)"]
    assert code == 0 and all(w in out for w in words), out


def test_end_of_input_ends_the_session(checkpoints, monkeypatch, capsys):
    assert run(monkeypatch, capsys, "--model_path", str(checkpoints / "pretrained"), stdin="今天天气\n")[0] == 0


def test_a_long_conversation_loses_its_oldest_exchanges_first(checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(checkpoints / "sft")
    history = [{"role": "system", "content": "系统"}]
    for i in range(5):
        history += [{"role": "user", "content": f"问题{i}" * 20}, {"role": "assistant", "content": f"回答{i}" * 20}]
    history.append({"role": "user", "content": "最后的问题"})
    full = chat.prompt_ids(tokenizer, history, limit=10_000)
    kept = tokenizer.decode(chat.prompt_ids(tokenizer, history, limit=full.shape[1] // 2)[0])
    assert kept.startswith("<|im_start|>system\n系统<|im_end|>")
    assert kept.endswith("最后的问题<|im_end|>\n<|im_start|>assistant\n")
    assert "问题0" not in kept and "回答4" in kept


def checkpoint_folders(root):
    """(folder, expected error) of checkpoints chat.py cannot use."""
    (root / "empty").mkdir()
    (root / "checkpoint-8" / "global_step8").mkdir(parents=True)
    (root / "no_weights").mkdir()
    load_config("tiny").save_pretrained(root / "no_weights")
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(root / "bert")
    return [(root / "absent", f"error: no model folder {root / 'absent'}: train one (bash pretrain.sh, bash finetune.sh), "
                              "or pass --model_path"),
            (root / "empty", f"error: {root / 'empty'} has no config.json: not a Hugging Face model folder"),
            (root / "checkpoint-8" / "global_step8", "use its checkpoint-N parent"),
            (root / "no_weights", "has a config.json but no weights (model.safetensors or pytorch_model.bin)"),
            (root / "bert", "holds BertForMaskedLM, not a causal language model")]


def test_unusable_checkpoints_are_one_line_errors(tmp_path, monkeypatch, capsys):
    for folder, message in checkpoint_folders(tmp_path):
        code, out, err = run(monkeypatch, capsys, "--model_path", str(folder), "--prompt", "你好")
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err
