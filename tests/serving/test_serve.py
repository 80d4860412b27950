"""serve.py: real servers (one for a fine-tuned checkpoint, one for a pretrained one) on 127.0.0.1, asked by the
official openai client and by the chat page in a real headless Chromium. The checkpoints are tiny random models saved
the way finetune.sh and pretrain.sh save theirs: what is tested is the serving, so a greedy answer must equal
chat.py's, whatever it says. Both servers need an API key (the fine-tuned one's from SEQLM_API_KEY, the other's from
--api_key); the pretrained one has small limits, so that a test reaches them."""
import concurrent.futures
import json
import os
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
import serve
from seqlm.data.conversation import prepare_chat_tokenizer, set_chat_eos
from seqlm.model import load_config
from seqlm.tokenizer import offline_tokenizer_dir

PROMPT = "你好，请介绍一下长城。"
START_TIMEOUT = 180  # seconds: importing torch and transformers on 2 busy cores
KEYS = {"sft": "sft-key-7f3a9c", "pretrained": "pretrained-key-51d2e8"}
PRETRAINED_LIMITS = ["--max_queue", "1", "--max_prompt_chars", "3000", "--max_request_bytes", "100000"]


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
    options = {"sft": ([], {"SEQLM_API_KEY": KEYS["sft"]}),
               "pretrained": (["--api_key", KEYS["pretrained"], *PRETRAINED_LIMITS], {})}
    for name, (args, env) in options.items():
        port, log = free_port(), checkpoints / f"{name}.log"  # a file, not a pipe: a full pipe would block the server
        with open(log, "w") as out:
            process = subprocess.Popen(serve_command("--model_path", str(checkpoints / name), "--port", str(port),
                                                     *args), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                       env={**without_key(), **env})
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


def without_key() -> dict:
    return {k: v for k, v in os.environ.items() if k != "SEQLM_API_KEY"}


def client(servers: dict, name: str, key: str | None = None, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{servers[name]}/v1", api_key=key or KEYS[name], max_retries=retries, timeout=120)


def authorized(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def token_time(servers: dict, name: str) -> float:
    """Seconds a generated token takes on this server now, from a 200-token answer timed: a bound in these units holds
    on a loaded machine as well as on an idle one (a client's request is answered after every generation before it)."""
    start = time.monotonic()
    usage = client(servers, name).chat.completions.create(
        model=name, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=200).usage
    return (time.monotonic() - start) / usage.completion_tokens


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


def test_no_checkpoint_at_either_default_names_both(tmp_path, monkeypatch, capsys):
    """Without --model_path the server takes output/sft, else output/pretrain: where neither is, the line names both."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["serve.py"])
    assert serve.main() == 2
    assert capsys.readouterr().err == ("error: no model folder output/sft nor output/pretrain (the defaults, in that "
                                       "order): train one (bash finetune.sh, bash pretrain.sh), or pass --model_path\n")


def test_chat_streamed_or_not_answers_as_chat_py_greedy(servers, checkpoints, monkeypatch, capsys):
    api = client(servers, "sft")
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
    api = client(servers, "pretrained")
    text = api.completions.create(model="pretrained", prompt="中国的首都是", temperature=0, max_tokens=16)
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="pretrained", prompt="中国的首都是", temperature=0, max_tokens=16, stream=True))
    assert text.choices[0].text == streamed
    expected = chat_py(monkeypatch, capsys, checkpoints / "pretrained", "中国的首都是", 16)
    assert streamed.strip() == expected.strip()
    with pytest.raises(openai.BadRequestError, match="without a chat template: it continues text.*/v1/completions"):
        api.chat.completions.create(model="pretrained", messages=[{"role": "user", "content": PROMPT}])


def test_bad_requests_are_clear_errors_and_the_server_keeps_serving(servers):
    api = client(servers, "sft")
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


def test_streams_end_with_done_as_openais_do(servers):
    """Read as raw server-sent events, as a client without the openai package does: JSON chunks, then `data: [DONE]`."""
    requests_ = [("sft", "chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
                 ("pretrained", "completions", {"prompt": "中国的首都是"})]
    for name, route, body in requests_:
        with requests.post(f"{servers[name]}/v1/{route}", json={"model": name, "max_tokens": 4, "stream": True, **body},
                           headers=authorized(name), stream=True, timeout=120) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line.decode() for line in response.iter_lines() if line]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]", events
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks and chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]


def test_a_client_leaving_mid_stream_stops_its_generation(servers):
    url = servers["sft"]
    body = {"model": "sft", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 2000,
            "stream": True}
    with requests.post(f"{url}/v1/chat/completions", json=body, headers=authorized("sft"), stream=True,
                       timeout=60) as response:
        lines = response.iter_lines()
        assert sum(1 for _, line in zip(range(8), lines) if line.startswith(b"data: ")) >= 3
    # One inference thread answers requests in turn: had the 2,000 tokens gone on, this would wait for them.
    start = time.monotonic()
    client(servers, "sft").chat.completions.create(model="sft", messages=[{"role": "user", "content": "再见"}],
                                                   max_tokens=4)
    assert time.monotonic() - start < 200 * token_time(servers, "sft")


def test_eight_concurrent_requests_are_all_answered(servers):
    api = client(servers, "sft")

    def ask(i: int):
        return api.chat.completions.create(model="sft", messages=[{"role": "user", "content": f"第{i}个问题"}],
                                           temperature=0, max_tokens=8)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert [a.usage.completion_tokens for a in answers] == [8] * 8
    assert len({a.choices[0].message.content for a in answers}) > 1  # each its own prompt's answer
    assert answers[3].choices[0].message.content == ask(3).choices[0].message.content


def test_a_public_address_without_a_key_is_one_line_at_start(tmp_path):
    """Said before anything else (here the absent folder ends the start: no model is loaded for it)."""
    command = serve_command("--host", "0.0.0.0", "--port", str(free_port()), "--model_path", str(tmp_path / "absent"))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=without_key())
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 2
    assert lines[0] == ("note: listening on 0.0.0.0 without an API key: anyone who can reach this machine can use the "
                        "model (set SEQLM_API_KEY)")
    assert lines[1].startswith(f"error: no model folder {tmp_path / 'absent'}")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**without_key(), "SEQLM_API_KEY": "k"})
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: no model folder {tmp_path / 'absent'}")


def test_a_port_left_in_time_wait_by_a_stopped_server_is_not_in_use(tmp_path):
    """A server that closed its connections first leaves them in TIME_WAIT on its port; uvicorn binds with
    SO_REUSEADDR, so the port check must too, or a restart right after a stop is refused."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn listens
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as visitor:
            accepted, _ = listener.accept()
            accepted.close()  # the server's side closes first: its end of the connection waits (TIME_WAIT)
            assert visitor.recv(1) == b""
    states = subprocess.run(["ss", "-tan", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert "TIME-WAIT" in states, states
    result = subprocess.run(serve_command("--port", str(port), "--model_path", str(tmp_path / "absent")), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(f"error: no model folder {tmp_path / 'absent'}")


def test_every_api_route_needs_the_key_but_the_page_and_health_do_not(servers):
    for name in ("sft", "pretrained"):  # the key from SEQLM_API_KEY, and from --api_key
        url, other = servers[name], "pretrained" if name == "sft" else "sft"
        assert [m.id for m in client(servers, name).models.list().data] == [name]
        with pytest.raises(openai.AuthenticationError, match="wrong API key") as refused:
            client(servers, name, key=KEYS[other]).models.list()
        assert refused.value.code == "invalid_api_key"
        for method, route in (("get", "/v1/models"), ("post", "/v1/chat/completions"), ("post", "/v1/completions")):
            response = requests.request(method, url + route, json={"prompt": "你好", "messages": []}, timeout=30)
            assert response.status_code == 401, route
            assert response.json()["error"]["message"].startswith("no API key: this server needs its API key")
        page = requests.get(url, timeout=30)
        assert page.status_code == 200 and "keyform" in page.text and KEYS[name] not in page.text
        assert requests.get(f"{url}/health", timeout=30).status_code == 200


def test_admin_routes_are_gone_and_requests_still_sample(servers):
    url = servers["pretrained"]
    for route in ("/reset", "/load_model"):
        response = requests.post(url + route, json={"model": "Qwen/Qwen2.5-0.5B"}, headers=authorized("pretrained"),
                                 timeout=30)
        assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"
    # Before, /reset unloaded the model and the reload lost sampling: the next default requests were greedy, empty.
    api = client(servers, "pretrained")
    answers = [api.completions.create(model="pretrained", prompt="中国的首都是", max_tokens=8).choices[0].text
               for _ in range(3)]
    assert all(answers) and len(set(answers)) > 1


def test_limits_on_prompt_characters_queued_generations_and_body_size(servers):
    """The pretrained server: --max_prompt_chars 3000 --max_queue 1 --max_request_bytes 100000."""
    api = client(servers, "pretrained")
    with pytest.raises(openai.BadRequestError, match="the prompt is 3,001 characters, this server takes at most "
                                                     "3,000"):
        api.completions.create(model="pretrained", prompt="长" * 3001, max_tokens=4)
    with pytest.raises(openai.APIStatusError) as too_large:
        api.completions.create(model="pretrained", prompt="a" * 100_001, max_tokens=4)
    assert too_large.value.status_code == 413 and too_large.value.response.text == "Content Too Large"
    chunked = requests.post(f"{servers['pretrained']}/v1/completions", data=iter([b" " * 60_000] * 2),
                            headers=authorized("pretrained"), timeout=30)  # no Content-Length: the bytes are counted
    assert chunked.status_code == 413 and chunked.json()["error"]["message"] == "Content Too Large"

    # One generation runs, one waits: a third is refused until they end (2,000 tokens take over 30 s here).
    running = [api.completions.create(model="pretrained", prompt=f"第{i}个", max_tokens=2000, stream=True)
               for i in range(2)]
    with pytest.raises(openai.RateLimitError, match="the server is busy: 2 generations are running or waiting") as busy:
        api.completions.create(model="pretrained", prompt="再见", max_tokens=4)
    assert busy.value.response.headers["Retry-After"] == "10" and busy.value.code == "queue_full"
    for stream in running:
        stream.close()  # the client leaves: its generation stops
    patient = client(servers, "pretrained", retries=6)  # the openai client waits as Retry-After says
    assert patient.completions.create(model="pretrained", prompt="再见", max_tokens=4).usage.completion_tokens == 4


def test_requests_the_server_cannot_honour_are_refused_naming_the_field(servers):
    api = client(servers, "sft")
    hello = [{"role": "user", "content": PROMPT}]
    cases = [(dict(messages=hello, n=3), "n", "n=3 is not supported by this server: leave it out, or send 1"),
             (dict(messages=hello, logprobs=True), "logprobs", "logprobs=true is not supported"),
             (dict(messages=hello, response_format={"type": "json_object"}), "response_format",
              'response_format={"type": "json_object"} is not supported'),
             (dict(messages=[{"role": "narrator", "content": PROMPT}]), "messages",
              r'messages\[0\].role is "narrator": this model\'s chat template takes system, user, assistant'),
             (dict(messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}, {
                 "type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]), "messages",
              r'messages\[0\].content\[1\] is a "image_url" part: this model reads text parts only'),
             (dict(messages=[{"role": "user", "content": 42}]), "messages",
              r"messages\[0\].content must be a string or a list of text parts")]
    for kwargs, param, message in cases:
        with pytest.raises(openai.BadRequestError, match=message) as refused:
            api.chat.completions.create(**{"model": "sft", "max_tokens": 4, **kwargs})
        assert refused.value.param == param
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported") as refused:
        api.completions.create(model="sft", prompt=PROMPT, n=2, max_tokens=4)
    assert refused.value.param == "n"
    with pytest.raises(openai.UnprocessableEntityError, match="Unexpected fields in the request: {'colour'}"):
        api.chat.completions.create(model="sft", messages=hello, max_tokens=4, extra_body={"colour": "red"})
    response = requests.post(f"{servers['sft']}/v1/chat/completions", data=b"[1, 2", headers=authorized("sft"),
                             timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("the request body must be a JSON object")
    # Text parts are read, n=1 and the other fields' no-op values are taken.
    answer = api.chat.completions.create(model="sft", messages=[{"role": "user", "content": [
        {"type": "text", "text": PROMPT}]}], n=1, logprobs=False, max_tokens=4)
    assert len(answer.choices) == 1 and answer.usage.completion_tokens == 4


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def chromium(language: str):
    """A headless Chromium whose first language (navigator.languages) is `language`."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Chromium and its driver: apt-get install -y chromium chromium-driver (docs/development.md)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--lang={language}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"intl.accept_languages": language})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def browser():
    yield from chromium("zh-CN")


@pytest.fixture(scope="module")
def english_browser():
    yield from chromium("en-US")


def open_page(driver, servers: dict, name: str) -> None:
    """Open a server's page and give it the key if it asks (once per browser and server)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(servers[name])
    if driver.find_element(By.ID, "keyform").is_displayed():
        driver.find_element(By.ID, "key").send_keys(KEYS[name], Keys.ENTER)
        WebDriverWait(driver, 30).until(lambda d: not d.find_element(By.ID, "keyform").is_displayed())


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

    api = client(servers, "sft")
    open_page(browser, servers, "sft")
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

    # Stop: the page drops the stream, the server stops generating (else the next answer would wait for 1,900 tokens).
    set_field(browser, "max_tokens", 1900)
    browser.find_element(By.ID, "input").send_keys("长城有多长？", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: int(d.find_elements(By.CSS_SELECTOR, "#log .assistant")[-1]
                                                   .get_attribute("data-chunks")) >= 3)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log .note"))
    set_field(browser, "max_tokens", 4)
    start = time.monotonic()
    page_answer(browser, "再见", 4)
    assert time.monotonic() - start < 200 * token_time(servers, "sft")


def test_the_page_continues_text_for_a_pretrained_checkpoint(servers, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, servers, "pretrained")
    assert browser.find_element(By.ID, "mode").get_attribute("value") == "text"
    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", 12)
    text, _ = page_answer(browser, "中国的首都是", 1)
    assert text == client(servers, "pretrained").completions.create(
        model="pretrained", prompt="中国的首都是", temperature=0, max_tokens=12).choices[0].text


def test_the_page_asks_for_the_key_once_in_the_browser_language(servers, browser, english_browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    labels = {browser: ("zh-CN", "本服务的 API 密钥", "密钥不对，请重新输入", "发送", "新对话", "续写",
                        "回车发送，Shift+回车换行"),
              english_browser: ("en", "API key of this server", "wrong key, try again", "send", "new chat",
                                "continue text", "Enter to send, Shift+Enter for a new line")}
    for driver, (lang, key, wrong, send, new, text, placeholder) in labels.items():
        driver.get(servers["sft"])
        driver.execute_script("localStorage.clear()")  # a browser that has never seen this server
        driver.refresh()
        form = driver.find_element(By.ID, "keyform")
        assert form.is_displayed() and driver.find_element(By.CSS_SELECTOR, "label[for=key]").text == key
        assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == lang
        assert [driver.find_element(By.ID, i).text for i in ("send", "new")] == [send, new]
        assert driver.find_element(By.CSS_SELECTOR, "#mode option[value=text]").text == text
        assert driver.find_element(By.ID, "input").get_attribute("placeholder") == placeholder
        driver.find_element(By.ID, "key").send_keys(KEYS["pretrained"], Keys.ENTER)  # another server's key
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "keynote").text == wrong)
        driver.find_element(By.ID, "key").clear()
        driver.find_element(By.ID, "key").send_keys(KEYS["sft"], Keys.ENTER)
        WebDriverWait(driver, 30).until(lambda d: not d.find_element(By.ID, "keyform").is_displayed())
        set_field(driver, "max_tokens", 4)
        answer, _ = page_answer(driver, PROMPT, 1)
        assert answer and not driver.find_elements(By.CSS_SELECTOR, ".error")
        driver.refresh()  # asked once: the key is kept
        assert not driver.find_element(By.ID, "keyform").is_displayed()
        set_field(driver, "max_tokens", 4)
        assert page_answer(driver, PROMPT, 1)[0] and not driver.find_elements(By.CSS_SELECTOR, ".error")
