"""serve.py: real servers (one for a fine-tuned checkpoint, one for a pretrained one) on 127.0.0.1, asked by the
official openai client and by the chat page in a real headless Chromium. The checkpoints are tiny random models saved
the way finetune.sh and pretrain.sh save theirs: what is tested is the serving, so a greedy answer must equal
chat.py's, whatever it says."""
import concurrent.futures
import shutil
import socket
import subprocess
import sys
import time

import openai
import pytest
import requests
import torch
from helpers import REPO, free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

import chat
from seqlm.data.conversation import prepare_chat_tokenizer, set_chat_eos
from seqlm.model import load_config
from seqlm.tokenizer import offline_tokenizer_dir

PROMPT = "你好，请介绍一下长城。"
START_TIMEOUT = 180  # seconds: importing torch and transformers on 2 busy cores


@pytest.fixture(scope="module")
def checkpoints(module_tmp):
    """pretrained/ and sft/, as in test_chat.py; weights drawn wider than the default so that answers change with the
    prompt (a default tiny random model repeats one token whatever it is asked)."""
    root = module_tmp("serve")
    torch.manual_seed(0)
    config = load_config("tiny")
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(str(offline_tokenizer_dir()))
    tokenizer.eos_token = "<|endoftext|>"
    model.save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    prepare_chat_tokenizer(tokenizer, "你是一个助手。")
    set_chat_eos(model, tokenizer)
    model.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    return root


def serve_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "serve.py"), *args]


@pytest.fixture(scope="module")
def servers(checkpoints):
    """{"sft": base URL, "pretrained": base URL}: both servers start at once, each on a free port."""
    started = {}
    for name in ("sft", "pretrained"):
        port, log = free_port(), checkpoints / f"{name}.log"  # a file, not a pipe: a full pipe would block the server
        with open(log, "w") as out:
            process = subprocess.Popen(serve_command("--model_path", str(checkpoints / name), "--port", str(port)),
                                       cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        started[name] = (process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT
    for name, (process, url, log) in started.items():
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"{name} server did not start"
            time.sleep(0.5)
    yield {name: url for name, (_, url, _) in started.items()}
    for process, _, _ in started.values():
        process.terminate()
        process.wait(timeout=30)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat_py(monkeypatch, capsys, model_path, prompt: str, max_new_tokens: int) -> str:
    """What `python chat.py --greedy --prompt PROMPT` prints (run in this process: no second start-up to wait for)."""
    monkeypatch.setattr(sys, "argv", ["chat.py", "--model_path", str(model_path), "--prompt", prompt, "--greedy",
                                      "--repetition_penalty", "1.0", "--max_new_tokens", str(max_new_tokens)])
    capsys.readouterr()
    assert chat.main() == 0
    return capsys.readouterr().out


def test_unusable_checkpoints_busy_ports_and_cpu_batching_are_one_line_errors(tmp_path):
    """Before the model is loaded (the kinds of unusable folder are test_chat.py's: the same check_model_folder)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = [(["--model_path", str(tmp_path / "absent")], f"error: no model folder {tmp_path / 'absent'}"),
                 (["--port", str(busy.getsockname()[1])], "is in use (another server?): pass --port"),
                 (["--device", "cpu", "--continuous_batching"], "--continuous_batching is for GPUs")]
        for args, message in cases:
            result = subprocess.run(serve_command(*args), cwd=REPO, capture_output=True, text=True, timeout=120)
            assert result.returncode == 2 and result.stdout == ""
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_chat_streamed_or_not_answers_as_chat_py_greedy(servers, checkpoints, monkeypatch, capsys):
    api = client(servers["sft"])
    assert [m.id for m in api.models.list().data] == ["sft"]  # the folder's name, not its path
    messages = [{"role": "user", "content": PROMPT}]
    answer = api.chat.completions.create(model="sft", messages=messages, temperature=0, max_tokens=24)
    assert answer.model == "sft" and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 24
    chunks = [c.choices[0].delta.content for c in
              api.chat.completions.create(model="sft", messages=messages, temperature=0, max_tokens=24, stream=True)
              if c.choices and c.choices[0].delta.content]
    assert len(chunks) > 1
    expected = chat_py(monkeypatch, capsys, checkpoints / "sft", PROMPT, 24).strip()
    assert expected and answer.choices[0].message.content.strip() == "".join(chunks).strip() == expected


def test_a_pretrained_checkpoint_continues_text_and_refuses_chat(servers, checkpoints, monkeypatch, capsys):
    api = client(servers["pretrained"])
    text = api.completions.create(model="pretrained", prompt="中国的首都是", temperature=0, max_tokens=16)
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="pretrained", prompt="中国的首都是", temperature=0, max_tokens=16, stream=True))
    assert text.choices[0].text == streamed
    expected = chat_py(monkeypatch, capsys, checkpoints / "pretrained", "中国的首都是", 16)
    assert streamed.strip() == expected.strip()
    with pytest.raises(openai.BadRequestError, match="without a chat template: it continues text.*/v1/completions"):
        api.chat.completions.create(model="pretrained", messages=[{"role": "user", "content": PROMPT}])


def test_bad_requests_are_clear_errors_and_the_server_keeps_serving(servers):
    api = client(servers["sft"])
    long = "长城" * 3000  # ≈ 3,000 tokens, the context is 2,048
    cases = [(dict(messages=[{"role": "user", "content": "  "}]), openai.BadRequestError, "the prompt is empty"),
             (dict(messages=[]), openai.BadRequestError, "the prompt is empty"),
             (dict(messages=[{"role": "user", "content": long}]), openai.BadRequestError,
              r"the prompt is 3,\d+ tokens, the model's context is 2,048"),
             (dict(messages=[{"role": "user", "content": PROMPT}], max_tokens=4000), openai.BadRequestError,
              r"exceed the model's context of 2,048 tokens: ask for at most 2,0\d\d"),
             (dict(messages=[{"role": "user", "content": PROMPT}], temperature=-1), openai.BadRequestError,
              "temperature must be a number from 0 to 2"),
             (dict(messages=[{"role": "user", "content": PROMPT}], model="gpt-4"), openai.NotFoundError,
              "this server serves the model 'sft', not 'gpt-4'")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            api.chat.completions.create(**{"model": "sft", "max_tokens": 4, **kwargs})
    with pytest.raises(openai.BadRequestError, match="the prompt is empty"):
        api.completions.create(model="sft", prompt="", max_tokens=4)
    assert api.chat.completions.create(model="sft", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=4).usage.completion_tokens == 4


def test_a_client_leaving_mid_stream_stops_its_generation(servers):
    url = servers["sft"]
    body = {"model": "sft", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 2000,
            "stream": True}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        assert sum(1 for _, line in zip(range(8), lines) if line.startswith(b"data: ")) >= 3
    # One inference thread answers requests in turn: had the 2,000 tokens gone on (> 30 s here), this would wait.
    start = time.monotonic()
    client(url).chat.completions.create(model="sft", messages=[{"role": "user", "content": "再见"}], max_tokens=4)
    assert time.monotonic() - start < 10


def test_eight_concurrent_requests_are_all_answered(servers):
    api = client(servers["sft"])

    def ask(i: int):
        return api.chat.completions.create(model="sft", messages=[{"role": "user", "content": f"第{i}个问题"}],
                                           temperature=0, max_tokens=8)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert [a.usage.completion_tokens for a in answers] == [8] * 8
    assert len({a.choices[0].message.content for a in answers}) > 1  # each its own prompt's answer
    assert answers[3].choices[0].message.content == ask(3).choices[0].message.content


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Chromium and its driver: apt-get install -y chromium chromium-driver (docs/development.md)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--lang=zh-CN"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def page_answer(driver, prompt: str, count: int) -> tuple[str, int]:
    """Type `prompt` and press Enter; wait for the `count`-th answer to finish: (its text, chunks streamed into it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "input").send_keys(prompt, Keys.ENTER)

    def finished(d):
        answers = d.find_elements(By.CSS_SELECTOR, "#log .assistant")
        return len(answers) >= count and answers[count - 1].get_attribute("data-done") and answers[count - 1]

    answer = WebDriverWait(driver, 60).until(finished)
    return answer.get_attribute("textContent"), int(answer.get_attribute("data-chunks"))


def set_field(driver, field: str, value) -> None:
    driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]", field, str(value))


def test_the_chat_page_in_a_browser(servers, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    api = client(servers["sft"])
    browser.get(servers["sft"])
    assert browser.find_element(By.ID, "model").text == "sft"
    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", 16)
    first, chunks = page_answer(browser, PROMPT, 1)
    assert chunks > 1  # streamed, not delivered at once
    history = [{"role": "user", "content": PROMPT}]
    assert first.strip() == api.chat.completions.create(model="sft", messages=history, temperature=0,
                                                        max_tokens=16).choices[0].message.content.strip()
    assert browser.find_elements(By.CSS_SELECTOR, "#log .user")[0].text == PROMPT  # Chinese typed, shown as is

    second, _ = page_answer(browser, "再说一遍", 2)  # the second turn is asked with the first one
    history += [{"role": "assistant", "content": first.strip()}, {"role": "user", "content": "再说一遍"}]
    assert second.strip() == api.chat.completions.create(model="sft", messages=history, temperature=0,
                                                         max_tokens=16).choices[0].message.content.strip()

    # Enter while an input method composes (pinyin → 汉字) picks a candidate: it must not send.
    set_field(browser, "input", "chang")
    browser.execute_script("document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown', "
                           "{key: 'Enter', keyCode: 229, isComposing: true, bubbles: true}))")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#log .user")) == 2
    set_field(browser, "input", "")

    browser.find_element(By.ID, "new").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []
    fresh, _ = page_answer(browser, PROMPT, 1)  # a new chat forgets the old one
    assert fresh == first

    set_field(browser, "max_tokens", 5000)  # past the context: the server's message, on the page
    page_answer(browser, "长城有多长？", 2)
    assert "exceed the model's context of 2,048 tokens" in browser.find_element(By.CSS_SELECTOR, ".error").text

    # Stop: the page drops the stream, the server stops generating (else the next answer would wait > 30 s).
    set_field(browser, "max_tokens", 1900)
    browser.find_element(By.ID, "input").send_keys("长城有多长？", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: int(d.find_elements(By.CSS_SELECTOR, "#log .assistant")[-1]
                                                   .get_attribute("data-chunks")) >= 3)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log .note"))
    set_field(browser, "max_tokens", 4)
    start = time.monotonic()
    page_answer(browser, "再见", 4)
    assert time.monotonic() - start < 10


def test_the_page_continues_text_for_a_pretrained_checkpoint(servers, browser):
    from selenium.webdriver.common.by import By

    browser.get(servers["pretrained"])
    assert browser.find_element(By.ID, "mode").get_attribute("value") == "text"
    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", 12)
    text, _ = page_answer(browser, "中国的首都是", 1)
    assert text == client(servers["pretrained"]).completions.create(
        model="pretrained", prompt="中国的首都是", temperature=0, max_tokens=12).choices[0].text
