"""Standard benchmarks (seqlm.evaluation.benchmarks, benchmark.py, download_dataset.py --eval) through the real
lm-evaluation-harness, offline, on a tiny checkpoint whose answers are known in advance.

The checkpoint is a tiny Qwen2 that predicts every token to repeat the one before it: its layers add nothing to the
residual stream (o_proj and down_proj are zero), so the logits are the current token's embedding against all others,
and a token's own embedding wins by far (a strong final norm makes it a near certainty). On a multiple-choice task
whose right answer repeats the last character of the context and whose wrong answer repeats another character, it
must be right every time, and with labels shuffled it must score near chance. Task files and data are written here."""
import io
import json
import math
import random
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import REPO, write_jsonl
from hub import REPOS, cli, closed_url, server  # noqa: F401 (server: the hub stand-in fixture)
from transformers import AutoModelForCausalLM, TrainerState, TrainingArguments, default_data_collator

from seqlm.data.token_cache import BlockDataset, build_token_cache
from seqlm.evaluation import benchmarks
from seqlm.evaluation.benchmark_callback import BenchmarkCallback
from seqlm.evaluation.benchmarks import (
    BENCHMARKS,
    HELDOUT,
    Benchmark,
    centered,
    cross_check,
    run_suite,
    write_task_files,
)
from seqlm.evaluation.heldout import score_file
from seqlm.evaluation.report import write_report
from seqlm.model import load_config
from seqlm.training import throughput
from seqlm.training.arguments import BenchmarkArguments
from seqlm.training.trainer import SafeTrainer

ENDOFTEXT = 151643
REPEATS = 4  # characters in each choice
DOCS = 160  # shuffled labels: accuracy ~ Binomial(160, 1/2)/160, sd 0.04; 0.5 ± 0.15 is 3.8 sd (and seeded)


@pytest.fixture(scope="module")
def checkpoint(module_tmp, offline_qwen_tokenizer):
    folder = module_tmp("copy_model")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config("tiny"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(30.0)
    model.save_pretrained(folder)
    offline_qwen_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(checkpoint, offline_qwen_tokenizer):
    return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), offline_qwen_tokenizer


def single_token_chars(tokenizer, texts: list[str]) -> list[str]:
    """Characters of the text that stay one token each however often they repeat, also right after a context."""
    chars = sorted({c for t in texts for c in t if "\u4e00" <= c <= "\u9fff"})
    ok = []
    for c in chars:
        ids = tokenizer(c * (REPEATS + 1), add_special_tokens=False)["input_ids"]
        if len(ids) == REPEATS + 1 and len(set(ids)) == 1:
            ok.append(c)
    return ok


def choice_docs(tokenizer, texts: list[str], shuffled: bool) -> list[dict]:
    """DOCS questions: a context ending in character c, the choices c×4 and d×4 in random order; the gold label
    points at c×4, or (shuffled) at a random one of the two."""
    chars = single_token_chars(tokenizer, texts)
    assert len(chars) > 50
    rng = random.Random(1)
    docs: list[dict] = []
    while len(docs) < DOCS:
        c, d = rng.sample(chars, 2)
        context = rng.choice(texts)[:10] + c
        ids = tokenizer(context + c * REPEATS, add_special_tokens=False)["input_ids"]
        if len(set(ids[-REPEATS - 1:])) > 1:  # c merged with the character before it: the context ends otherwise
            continue
        choices = [c * REPEATS, d * REPEATS]
        rng.shuffle(choices)
        gold = rng.randrange(2) if shuffled else choices.index(c * REPEATS)
        docs.append({"context": context, "choices": choices, "gold": gold})
    return docs


def choice_task(task_dir: Path, name: str, docs: list[dict]) -> None:
    data = task_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (task_dir / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "gold", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}, allow_unicode=True))


def run(loaded, task_dir: Path, names: list[str], chat: bool = False, **kwargs) -> dict[str, dict]:
    model, tokenizer = loaded
    suite = [BENCHMARKS.get(n) or Benchmark(n, "acc", 1 / 2, 2) for n in names]
    rows = run_suite(model, tokenizer, suite, task_dir, chat=chat, batch_size=32, max_length=128,
                     prefix_token_id=ENDOFTEXT, **kwargs)
    return {r["name"]: r for r in rows}


def test_multiple_choice_is_right_when_it_must_be_and_near_chance_on_shuffled_labels(loaded, tmp_path,
                                                                                      peoples_daily_texts):
    tokenizer = loaded[1]
    choice_task(tmp_path, "repeat_right", choice_docs(tokenizer, peoples_daily_texts, shuffled=False))
    choice_task(tmp_path, "repeat_shuffled", choice_docs(tokenizer, peoples_daily_texts, shuffled=True))
    rows = run(loaded, tmp_path, ["repeat_right", "repeat_shuffled"])
    right, shuffled = rows["repeat_right"], rows["repeat_shuffled"]
    assert right["documents"] == shuffled["documents"] == DOCS
    assert right["value"] == 1.0 and right["centered"] == 1.0
    assert abs(shuffled["value"] - 0.5) < 0.15 and abs(shuffled["centered"]) < 0.3
    assert right["stderr"] == 0.0 and 0.02 < shuffled["stderr"] < 0.05  # lm-eval's standard error of the mean


def test_rolling_bits_per_byte_is_the_per_document_log_likelihood(loaded, tmp_path, peoples_daily_texts):
    """lm-eval's bits per byte on our held-out task, against a sum of the model's own log-probabilities: each
    document alone, predicted token by token after the separator, over its UTF-8 bytes."""
    model, tokenizer = loaded
    texts = [t[:60] for t in peoples_daily_texts[:12]]  # shorter than max_length: one window each
    heldout = write_jsonl(tmp_path / "val.jsonl", texts)
    write_task_files([BENCHMARKS[HELDOUT]], tmp_path / "tasks", tmp_path / "no_data", heldout)
    row = run(loaded, tmp_path / "tasks", [HELDOUT])[HELDOUT]
    nats = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[ENDOFTEXT, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            nats -= log_probs[:-1].gather(1, ids[0, 1:, None]).sum().item()
    expected = nats / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)
    assert row["documents"] == len(texts) and row["chance"] is None and row["centered"] is None
    assert row["value"] == pytest.approx(expected, rel=1e-4)
    assert row["byte_perplexity"] == pytest.approx(2 ** expected, rel=1e-4)


def test_centered_accuracy_and_the_suite_average():
    assert centered(0.25, 0.25) == 0 and centered(1.0, 0.5) == 1 and centered(0.4, 0.5) == pytest.approx(-0.2)
    rows = [dict(name="a", metric="acc", value=0.75, centered=centered(0.75, 0.5)),
            dict(name="b", metric="acc_norm", value=0.25, centered=centered(0.25, 0.25)),
            dict(name=HELDOUT, metric="bits_per_byte", value=2.0, centered=None)]
    assert benchmarks.average_centered(rows) == pytest.approx(0.25)
    assert benchmarks.log_keys(rows) == {"bench_a_acc": 0.75, "bench_a_centered": 0.5, "bench_b_acc_norm": 0.25,
                                         "bench_b_centered": 0.0, "bench_heldout_bpb_bits_per_byte": 2.0,
                                         "bench_average_centered": 0.25}


# The answers each question offers, from the datasets' papers: story endings (XStoryCloze), causes or effects (XCOPA),
# the two candidates of a Winograd schema, HellaSwag's four endings, the options A–D of C-Eval and CMMLU.
CHOICES_PER_QUESTION = {"xstorycloze_zh": 2, "xcopa_zh": 2, "xwinograd_zh": 2, "hellaswag_zh": 4, "ceval-valid": 4,
                        "cmmlu": 4}


def test_chance_levels_are_one_over_the_number_of_choices():
    accuracies = {name: b for name, b in BENCHMARKS.items() if b.chance is not None}
    assert set(accuracies) == set(CHOICES_PER_QUESTION)
    for name, b in accuracies.items():
        assert b.chance == pytest.approx(1 / CHOICES_PER_QUESTION[name]), name


def test_cross_check_explains_a_gap_over_two_percent():
    assert cross_check(1.01, 1.0)["note"] is None
    check = cross_check(1.05, 1.0)
    assert check["relative_gap"] == pytest.approx(0.05) and "separator" in check["note"]


# ---------------------------------------------------------------------------------------------------------------------
# The built-in tasks, on local data in the layout download_dataset.py --eval leaves


def hub_rows(b: Benchmark, n: int, rng: random.Random) -> list[dict]:
    """n rows in the columns lm-eval's YAML of this task reads."""
    def sentence():
        return "".join(rng.choice("天地人你我他上下大小中国家事业") for _ in range(8)) + "。"
    if b.name == "xstorycloze_zh":
        return [{**{f"input_sentence_{k}": sentence() for k in range(1, 5)}, "sentence_quiz1": sentence(),
                 "sentence_quiz2": sentence(), "answer_right_ending": rng.choice([1, 2])} for _ in range(n)]
    if b.name == "xcopa_zh":
        return [{"premise": sentence(), "choice1": sentence(), "choice2": sentence(),
                 "question": rng.choice(["cause", "effect"]), "label": rng.randrange(2)} for _ in range(n)]
    if b.name == "xwinograd_zh":
        return [{"sentence": sentence()[:4] + "_" + sentence(), "option1": "天", "option2": "地",
                 "answer": rng.choice(["1", "2"])} for _ in range(n)]
    if b.name == "hellaswag_zh":
        return [{"activity_label": "生活", "ctx_a": sentence(), "ctx_b": sentence(), "label": str(rng.randrange(4)),
                 "endings": [sentence() for _ in range(3)] + [{"zh": sentence(), "en": "x"}]} for _ in range(n)]
    question, answer = ("question", "answer") if b.name == "ceval-valid" else ("Question", "Answer")
    return [{question: sentence(), **{k: sentence() for k in "ABCD"}, answer: rng.choice("ABCD")} for _ in range(n)]


def hub_files(b: Benchmark, n: int = 3) -> dict[str, bytes]:
    """The files of a benchmark's repo as download_dataset.py --eval fetches them, n rows a split."""
    rng = random.Random(b.name)
    if b.data_file:
        return {b.data_file: "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                     for r in hub_rows(b, n, rng)).encode()}
    tasks = benchmarks.lm_eval_tasks_dir()
    if b.group:
        members = yaml.safe_load((tasks / b.builtin).read_text())["task"]
        configs = [yaml.safe_load((tasks / Path(b.builtin).parent / f"{m}.yaml").read_text())["dataset_name"]
                   for m in members]
    else:
        configs = [b.config]
    splits = {"xstorycloze_zh": ["train", "eval"], "xcopa_zh": ["validation", "test"], "xwinograd_zh": ["test"],
              "ceval-valid": ["dev", "val", "test"], "cmmlu": ["dev", "test"]}[b.name]
    files = {}
    for config in configs:
        for split in splits:
            buffer = io.BytesIO()
            pd.DataFrame(hub_rows(b, n, rng)).to_parquet(buffer)
            files[f"{config}/{split}/0000.parquet"] = buffer.getvalue()
    return files


@pytest.fixture(scope="module")
def eval_data(module_tmp) -> Path:
    """data/eval/ as download_dataset.py --eval leaves it, for every benchmark with hub data."""
    root = module_tmp("eval_data")
    for b in BENCHMARKS.values():
        if b.repo:
            for name, data in hub_files(b).items():
                (root / b.repo / name).parent.mkdir(parents=True, exist_ok=True)
                (root / b.repo / name).write_bytes(data)
    return root


def test_every_task_of_the_suite_is_in_the_installed_lm_eval():
    tasks = benchmarks.lm_eval_tasks_dir()
    for b in BENCHMARKS.values():
        if b.builtin:
            assert (tasks / b.builtin).is_file(), b.builtin
    # Groups average their members' accuracies, and their members read the same repo.
    for name, members in [("ceval-valid", 52), ("cmmlu", 67)]:
        assert len(yaml.safe_load((tasks / BENCHMARKS[name].builtin).read_text())["task"]) == members


def test_built_in_tasks_run_offline_on_local_data(loaded, eval_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = ["xstorycloze_zh", "xcopa_zh", "xwinograd_zh", "hellaswag_zh", "ceval-valid"]
    write_task_files([BENCHMARKS[n] for n in names], tmp_path, eval_data, None)
    repaired = [json.loads(line) for line in (tmp_path / "hellaswag_zh.jsonl").read_text().splitlines()]
    assert all(isinstance(e, str) for doc in repaired for e in doc["endings"])
    rows = run(loaded, tmp_path, names, chat=True, limit=2)  # as for a fine-tuned checkpoint
    expected_docs = {"xstorycloze_zh": 2, "xcopa_zh": 2, "xwinograd_zh": 2, "hellaswag_zh": 2, "ceval-valid": 52 * 2}
    for name in names:
        r, b = rows[name], BENCHMARKS[name]
        assert (r["metric"], r["chance"], r["documents"]) == (b.metric, b.chance, expected_docs[name])
        assert 0 <= r["value"] <= 1 and r["centered"] == pytest.approx(centered(r["value"], b.chance))
        assert r["chat_template"] == (name == "ceval-valid")  # questions through the template, cloze tasks not


def test_missing_task_data_is_one_line(tmp_path):
    with pytest.raises(benchmarks.BenchmarkError, match=r"^no data for xcopa_zh in .*download_dataset.py --eval"):
        write_task_files([BENCHMARKS["xcopa_zh"]], tmp_path / "tasks", tmp_path / "empty", None)
    with pytest.raises(benchmarks.BenchmarkError, match="unknown benchmark nope"):
        benchmarks.resolve("xcopa_zh,nope")
    assert [b.name for b in benchmarks.resolve("cloze")][0] == HELDOUT


# ---------------------------------------------------------------------------------------------------------------------
# benchmark.py


def run_script(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """benchmark.py as from the command line, in this process (no second start-up of torch and lm-eval)."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # the script sets them: restore them afterwards
        monkeypatch.setenv(key, "0")
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *args])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(REPO / "benchmark.py"), run_name="__main__")
    out = capsys.readouterr()
    return exit.value.code, out.out, out.err


def test_benchmark_py_writes_json_and_markdown_with_the_cross_check(checkpoint, loaded, tmp_path, monkeypatch,
                                                                    capsys, peoples_daily_texts):
    heldout = write_jsonl(tmp_path / "val.jsonl", [t[:300] for t in peoples_daily_texts[:4]])  # a few blocks of 64
    out = tmp_path / "out"
    code, stdout, stderr = run_script(monkeypatch, capsys, "--model_path", str(checkpoint), "--suite", "local",
                                      "--heldout_file", str(heldout), "--max_length", "64", "--output_dir", str(out),
                                      "--token_cache_dir", str(tmp_path / "cache"))
    assert code == 0, stderr[-3000:]
    result = json.loads((out / "benchmarks.json").read_text())
    [row] = result["rows"]
    ours = score_file(loaded[0], loaded[1], ENDOFTEXT, heldout, 64, tmp_path / "cache", 8)
    check = result["cross_check"]
    assert check["eval_bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)
    assert check["lm_eval_bits_per_byte"] == row["value"] and result["max_length"] == 64
    assert check["relative_gap"] == pytest.approx(row["value"] / ours["bits_per_byte"] - 1)
    assert f"{row['value']:.4f}" in (out / "benchmarks.md").read_text() and f"{row['value']:.4f}" in stdout


@pytest.mark.parametrize("missing", ["checkpoint", "heldout file", "task data"])
def test_benchmark_py_says_what_is_missing_in_one_line(checkpoint, tmp_path, missing, monkeypatch, capsys):
    args = {"checkpoint": ["--model_path", str(tmp_path / "nope"), "--suite", "local"],
            "heldout file": ["--model_path", str(checkpoint), "--suite", "local", "--heldout_file",
                             str(tmp_path / "nope.jsonl")],
            "task data": ["--model_path", str(checkpoint), "--suite", "xcopa_zh", "--eval_data_dir",
                          str(tmp_path / "nope")]}[missing]
    code, _, stderr = run_script(monkeypatch, capsys, *args)
    assert code == 2
    assert stderr.startswith("error: ") and stderr.strip().count("\n") == 0 and "nope" in stderr


def test_benchmark_py_names_missing_task_data_before_the_held_out_file(checkpoint, tmp_path, monkeypatch, capsys):
    """Offline, `--suite cloze` lacks both: the task data are what download_dataset.py --eval fetches."""
    code, _, stderr = run_script(monkeypatch, capsys, "--model_path", str(checkpoint), "--suite", "cloze",
                                 "--eval_data_dir", str(tmp_path / "eval"),
                                 "--heldout_file", str(tmp_path / "val.jsonl"))
    assert code == 2
    assert stderr == (f"error: no data for xstorycloze_zh in {tmp_path / 'eval' / 'juletxara' / 'xstory_cloze'}/: run "
                      "`python download_dataset.py --eval` (or copy data/eval/ from a machine that did)\n")


def test_benchmark_py_scores_a_short_context_model_at_its_own_context(tmp_path, monkeypatch, capsys,
                                                                      offline_qwen_tokenizer, peoples_daily_texts):
    """A checkpoint of 1,024 positions, never trained here (no block size on record): scored at 1,024, not at the
    default 2,048; a longer --max_length is refused in one line that names that flag."""
    short = tmp_path / "short"
    config = load_config("tiny")
    config.max_position_embeddings = 1024
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(short)
    offline_qwen_tokenizer.save_pretrained(short)
    heldout = write_jsonl(tmp_path / "val.jsonl", peoples_daily_texts[:2])
    common = ["--model_path", str(short), "--suite", "local", "--heldout_file", str(heldout),
              "--token_cache_dir", str(tmp_path / "cache")]
    code, _, stderr = run_script(monkeypatch, capsys, *common)
    assert code == 0, stderr[-3000:]
    assert json.loads((short / "benchmarks" / "benchmarks.json").read_text())["max_length"] == 1024

    code, _, stderr = run_script(monkeypatch, capsys, *common, "--max_length", "2048")
    assert code == 2 and stderr.strip().count("\n") == 0
    assert stderr.startswith("error: --max_length 2048 exceeds the model's max_position_embeddings 1024")


# ---------------------------------------------------------------------------------------------------------------------
# download_dataset.py --eval, against the local stand-in of the hub


@pytest.fixture
def hub(server, monkeypatch, tmp_path):  # noqa: F811 (the fixture imported above)
    """The stand-in hub serving every benchmark's repo (on the branch it is fetched from: the fake has one commit)."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for b in BENCHMARKS.values():
        if b.repo:
            monkeypatch.setitem(REPOS, ("datasets", b.repo), hub_files(b, n=2))
    return server


def test_eval_download_then_nothing_again_then_offline(hub, tmp_path):
    out = cli(tmp_path, "--eval", HF_ENDPOINT=hub.url)
    assert out.returncode == 0, out.stderr
    for b in BENCHMARKS.values():
        if b.repo:
            for name, data in REPOS["datasets", b.repo].items():
                assert (tmp_path / "data" / "eval" / b.repo / name).read_bytes() == data
    asked = [path for _, path, _ in hub.seen if "/revision/" in path]
    assert "/api/datasets/ceval/ceval-exam/revision/refs%2Fconvert%2Fparquet" in asked
    assert "/api/datasets/alexandrainst/m_hellaswag/revision/main" in asked

    hub.seen.clear()
    again = cli(tmp_path, "--eval", HF_ENDPOINT=hub.url)
    assert again.returncode == 0, again.stderr
    assert all("/revision/" in path for _, path, _ in hub.seen)  # only which commit: no listing, no file

    offline = cli(tmp_path, "--eval", HF_ENDPOINT=closed_url())
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.count("keeping the files already in") == sum(1 for b in BENCHMARKS.values() if b.repo)


def test_eval_download_unreachable_is_one_line_naming_every_dataset(tmp_path, monkeypatch):
    """The hub unreachable fails every dataset alike: one line, each dataset and the folder for its files in it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    url = closed_url()
    out = cli(tmp_path, "--eval", HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf_home"))
    assert out.returncode == 1 and not out.stdout.count("Traceback") and "Traceback" not in out.stderr
    [line] = out.stderr.splitlines()
    repos = [b for b in BENCHMARKS.values() if b.repo]
    assert line.startswith("error: cannot download " + ", ".join(f"{b.repo} (branch {b.revision})" for b in repos)
                           + f" from the Hugging Face hub at {url} (HF_ENDPOINT) (ConnectError). ")
    assert all(str(tmp_path / "data" / "eval" / b.repo) in line for b in repos)


# ---------------------------------------------------------------------------------------------------------------------
# During training: BenchmarkCallback in the real Trainer, its scores in the log history and the report


def test_training_scores_the_suite_every_n_steps_and_at_the_end(tmp_path, offline_qwen_tokenizer,
                                                                 peoples_daily_texts):
    heldout = write_jsonl(tmp_path / "val.jsonl", [t[:200] for t in peoples_daily_texts[:3]])
    train = write_jsonl(tmp_path / "train.jsonl", peoples_daily_texts[10:14])
    blocks = BlockDataset(build_token_cache(train, offline_qwen_tokenizer, ENDOFTEXT, tmp_path / "cache"), 32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config("tiny"))
    options = BenchmarkArguments(benchmark_suite="local", benchmark_steps=2, benchmark_data_dir=str(tmp_path))
    callback = BenchmarkCallback.from_args(options, offline_qwen_tokenizer, max_length=64, separator_id=ENDOFTEXT,
                                           heldout_file=str(heldout))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", max_steps=5,
                             per_device_train_batch_size=2, logging_steps=100, save_strategy="no",
                             disable_tqdm=True)
    trainer = SafeTrainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator,
                          callbacks=[callback])
    callback.throughput = trainer.throughput
    excluded = []
    exclude = trainer.throughput.exclude
    trainer.throughput.exclude = lambda seconds: (excluded.append(seconds), exclude(seconds))
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    key = f"bench_{HELDOUT}_bits_per_byte"
    scored = [h for h in trainer.state.log_history if key in h]
    assert [h["step"] for h in scored] == [2, 4, 5]  # every 2 steps, and the last one
    assert all("loss" in h and 0 < h[key] < 30 for h in scored)  # with the step's training loss, in one entry
    assert scored[0][key] != scored[-1][key]  # the model being trained, not a copy from the start
    assert len(excluded) == 3 and min(excluded) > 0  # each suite's seconds left out of tokens/s

    report = write_report(tmp_path / "run").read_text()
    assert "## Benchmarks" in report and f"| 4 | {scored[1][key]:.4f} |" in report
    assert (tmp_path / "run" / "plots" / "benchmark_bits_per_byte.png").is_file()


def test_a_run_that_scores_benchmarks_trains_exactly_as_one_that_does_not(tmp_path, offline_qwen_tokenizer,
                                                                          peoples_daily_texts):
    """With attention dropout on, every step draws from torch's global generator, which lm-eval reseeds: the losses
    after a suite tell whether training went on from the state it had."""
    heldout = write_jsonl(tmp_path / "val.jsonl", [t[:200] for t in peoples_daily_texts[:3]])
    train = write_jsonl(tmp_path / "train.jsonl", peoples_daily_texts[10:14])
    blocks = BlockDataset(build_token_cache(train, offline_qwen_tokenizer, ENDOFTEXT, tmp_path / "cache"), 32)
    config = load_config("tiny")
    config.attention_dropout = 0.1

    def losses(scoring: bool) -> list[float]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        options = BenchmarkArguments(benchmark_suite="local", benchmark_steps=2, benchmark_data_dir=str(tmp_path))
        callbacks = [BenchmarkCallback.from_args(options, offline_qwen_tokenizer, max_length=64,
                                                 separator_id=ENDOFTEXT, heldout_file=str(heldout))] if scoring else []
        args = TrainingArguments(output_dir=str(tmp_path / f"run-{scoring}"), use_cpu=True, report_to="none",
                                 max_steps=5, per_device_train_batch_size=2, logging_steps=1, save_strategy="no",
                                 disable_tqdm=True, seed=3)
        trainer = SafeTrainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator,
                              callbacks=callbacks)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    scored = losses(scoring=True)
    assert len(scored) == 5 and scored == losses(scoring=False)


def test_throughput_leaves_out_the_time_a_suite_took(monkeypatch):
    clock = iter([100.0, 160.0, 160.0])  # interval start, the log, the next start
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    clocked = throughput.ThroughputCallback()
    state = TrainerState()
    state.num_input_tokens_seen = 0
    clocked.on_train_begin(None, state, None)  # the interval starts at 100 s
    clocked.exclude(50.0)  # a suite took 50 of the next 60 s
    state.num_input_tokens_seen = 1000
    logs = {"loss": 1.0}
    clocked.add_to(logs, state, TrainingArguments(output_dir="unused", use_cpu=True, report_to="none"))
    assert logs["tokens_per_second"] == 100  # 1,000 tokens in the 10 s of training


def test_training_refuses_a_suite_it_cannot_run_in_one_line(tmp_path, offline_qwen_tokenizer):
    # The missing task data first, naming the folder to fill, then a missing held-out file.
    options = BenchmarkArguments(benchmark_suite="cloze", benchmark_data_dir=str(tmp_path / "nope"))
    with pytest.raises(benchmarks.BenchmarkError, match=f"^no data for xstorycloze_zh in {tmp_path / 'nope'}/"):
        BenchmarkCallback.from_args(options, offline_qwen_tokenizer, max_length=64, separator_id=ENDOFTEXT)
    with pytest.raises(benchmarks.BenchmarkError, match="^heldout_bpb needs a held-out file"):
        BenchmarkCallback.from_args(BenchmarkArguments(benchmark_suite="local"), offline_qwen_tokenizer,
                                    max_length=64, separator_id=ENDOFTEXT)
    assert BenchmarkCallback.from_args(BenchmarkArguments(), offline_qwen_tokenizer, max_length=64,
                                       separator_id=ENDOFTEXT) is None
