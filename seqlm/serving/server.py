"""Serving a checkpoint over the OpenAI API, with a chat page, on the engine of `transformers serve`.

transformers' serving package does the work: the FastAPI app, `/v1/chat/completions` and `/v1/completions`
(streamed over server-sent events or not), `/v1/models`, `/health`, `model.generate` on one inference thread per
model (concurrent requests wait their turn; with continuous batching they share the forward passes), and the end of a
generation when its client disconnects. What this module adds, because `transformers serve` does not do it:

- checks before generating, each answered with a 400 in OpenAI's error format while the server goes on: an empty
  prompt; a prompt that, with the tokens asked for, does not fit the context (transformers would generate past
  `max_position_embeddings` without a word); a chat request to a checkpoint that only continues text (its answer
  would be noise, not a turn); a role or a content part the chat template cannot take; a field transformers would
  ignore (`n`, `logprobs`, ...) set to ask for something; a request for another model. Its other endpoints
  (responses, transcriptions, decisions) and its admin routes (`/reset`, `/load_model`) are not offered;
- limits for a server others reach (`Limits`): an API key; a cap on a prompt's characters, checked before it is
  tokenized, and the token count off the event loop; a bounded queue of generations (429 past it); a body size limit;
- sampling: requests sample (temperature 1 unless they say otherwise), as the OpenAI API does;
- streams end with `data: [DONE]`, as OpenAI's do;
- a name for the model (the folder's name, not the path on this disk) in requests and `/v1/models`;
- the chat page (`seqlm/serving/web/chat.html`) at `/`, on the same app and port, so it needs no CORS and no second server.

Everything heavy (torch, the serving package) is imported inside the functions that need it, so that serve.py can
reject a busy port at once, and a bad folder before loading a model.
"""
from __future__ import annotations

import errno
import hmac
import json
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from seqlm import paths

PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
# The answer length when a request sets none: transformers serve's own default, cut to what the context leaves.
DEFAULT_MAX_TOKENS = 1024
# How long a client refused for a full queue is told to wait: about one answer of a 0.5B model on a CPU.
RETRY_AFTER_S = 10
API_KEY_ENV = "SEQLM_API_KEY"
ROLES = ("system", "user", "assistant")  # those the chat template (seqlm/data/conversation.py) renders as turns
# Fields transformers serve accepts and then ignores with a log line: a request that sets one to anything but the
# value that is done anyway would get the answer to another question without a word, so it is refused.
HONOURED_ONLY_AS = {"n": 1, "best_of": 1, "echo": False, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0,
                    "response_format": {"type": "text"}, "modalities": ["text"], "audio": None, "functions": None,
                    "function_call": None, "prediction": None, "reasoning_effort": None, "web_search_options": None}


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server."""

    api_key: str | None = None  # required on every route but the page and /health, when set
    max_prompt_chars: int = 100_000  # tokenizing that many takes ≈ 0.2 s of one core; 2,000,000 took 9 s
    max_queue: int = 16  # generations waiting behind the running one
    max_request_bytes: int = 1_000_000  # max_prompt_chars of Chinese: 300 kB in UTF-8, 600 kB as \uXXXX escapes


DEFAULT_CHECKPOINTS = (paths.SFT_OUTPUT, paths.PRETRAIN_OUTPUT)  # what finetune.sh writes, else what pretrain.sh does


def default_checkpoint() -> str | None:
    """The first of DEFAULT_CHECKPOINTS that is there, or None."""
    return next((str(p) for p in DEFAULT_CHECKPOINTS if p.is_dir()), None)


def cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (a port in use, an unknown address), or None: checked before the
    model is loaded, not after."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As uvicorn binds: else the connections of a server just stopped (TIME_WAIT) would refuse its restart.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            return f"cannot listen on {host}: {e.strerror}"
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use (another server?): pass --port"
            return f"cannot listen on {host} port {port}: {e.strerror}"
    return None


@dataclass(frozen=True)
class ServedModel:
    """What the server serves: a checkpoint folder under a name, which either chats or continues text."""

    path: str
    name: str
    chat: bool  # its tokenizer has a chat template that ends turns with the eos token (finetune.py saves one)
    context: int  # max_position_embeddings: prompt + answer tokens

    @classmethod
    def from_folder(cls, path: str, name: str | None = None) -> ServedModel:
        """Read the folder's config and tokenizer (not its weights); ModelFolderError if they do not belong together."""
        from transformers import AutoConfig, AutoTokenizer

        from seqlm.data.conversation import is_chat_model
        from seqlm.model_folder import check_tokenizer_fits

        config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        check_tokenizer_fits(path, tokenizer, config.vocab_size)
        return cls(path=path, name=name or Path(path).resolve().name, chat=is_chat_model(tokenizer),
                   context=config.max_position_embeddings)


def error(status: int, message: str, code: str, param: str | None = None, headers: dict | None = None):
    """A JSON error as the OpenAI API writes it: the openai client raises it with `message` in its text."""
    from fastapi.responses import JSONResponse

    body = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class BadField(ValueError):
    """A request the server cannot honour, and the field that is wrong (OpenAI's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class QueueFull(Exception):
    """Every place in the queue of generations is taken: a 429 with Retry-After."""


class GenerationQueue:
    """The generations handed to the inference thread and not finished: the one running and those waiting behind it.
    Counted where they run, not per request: a client that leaves does not end its generation at once."""

    def __init__(self, max_queue: int):
        self.limit = max_queue + 1
        self.count = 0
        self.lock = threading.Lock()  # the inference thread gives places back

    def full(self) -> bool:
        return self.count >= self.limit

    def counted(self, generate):
        """`generate` holding a place until it returns; QueueFull if there is none."""
        with self.lock:
            if self.full():
                raise QueueFull
            self.count += 1

        def run(*args, **kwargs):
            try:
                return generate(*args, **kwargs)
            finally:
                with self.lock:
                    self.count -= 1

        return run


class RequestCheck:
    """Mixed into transformers' handlers: check a request, and name the served model, before the handler runs."""

    served: ServedModel
    limits: Limits
    queue: GenerationQueue

    def prompt_text(self, body: dict) -> str:
        """The prompt's text, from a body whose shape is checked (BadField): its characters are counted before
        anything is tokenized."""
        raise NotImplementedError

    def prompt_tokens(self, body: dict, tokenizer) -> int:
        """How many tokens the (checked, non-empty) prompt is."""
        raise NotImplementedError

    async def check(self, body: dict):
        """An error response for a request the model cannot answer well, else None (the body is then completed)."""
        from starlette.concurrency import run_in_threadpool

        served = self.served
        if body.get("model") not in (None, served.name, served.path):
            return error(404, f"this server serves the model '{served.name}', not '{body.get('model')}'",
                         "model_not_found", "model")
        body["model"] = served.name
        for key, honoured in HONOURED_ONLY_AS.items():
            if body.get(key) not in (None, honoured):
                also = f", or send {json.dumps(honoured)}" if honoured is not None else ""
                return error(400, f"{key}={json.dumps(body[key], ensure_ascii=False)[:80]} is not supported by this "
                                  f"server: leave it out{also}", "unsupported_value", key)
        for key, high in (("temperature", 2), ("top_p", 1)):  # OpenAI's ranges; out of them transformers fails: a 500
            value = body.get(key)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= high):
                return error(400, f"{key} must be a number from 0 to {high}", "invalid_value", key)
        try:
            text = self.prompt_text(body)
        except BadField as e:
            return error(400, str(e), "invalid_value", e.param)
        if not text.strip():
            return error(400, "the prompt is empty", "empty_prompt", "prompt")
        if len(text) > self.limits.max_prompt_chars:
            return error(400, f"the prompt is {len(text):,} characters, this server takes at most "
                              f"{self.limits.max_prompt_chars:,}", "prompt_too_long")
        if self.queue.full():  # before tokenizing: a refused request costs nothing
            raise QueueFull
        _, tokenizer = self.model_manager.load_model_and_processor(served.name)  # loaded at start: a dict look-up
        # Off the event loop: the streams being served go on while a long prompt is counted.
        prompt = await run_in_threadpool(self.prompt_tokens, body, tokenizer)
        room = served.context - prompt
        if room <= 0:
            return error(400, f"the prompt is {prompt:,} tokens, the model's context is {served.context:,}: shorten "
                              "it", "context_length_exceeded")
        key = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
        if key is None:
            body["max_tokens"] = min(DEFAULT_MAX_TOKENS, room)
            return None
        asked = body[key]
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
            return error(400, f"{key} must be a positive integer", "invalid_value", key)
        if asked > room:
            return error(400, f"the prompt ({prompt:,} tokens) and {key} ({asked:,}) exceed the model's context of "
                              f"{served.context:,} tokens: ask for at most {room:,}", "context_length_exceeded", key)
        return None

    async def handle_request(self, body: dict, request_id: str):
        from fastapi.responses import StreamingResponse

        response = await self.check(body) or await super().handle_request(body, request_id)
        if isinstance(response, StreamingResponse):
            response.body_iterator = ended_with_done(response.body_iterator)
        return response


async def ended_with_done(events):
    """A stream's events, then `data: [DONE]`: OpenAI's API ends every stream so, and clients that read the events
    themselves wait for it (transformers serve 5.24 ends with the last chunk)."""
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()  # a client that left: transformers' stream cancels its generation when it is closed
    yield "data: [DONE]\n\n"


class NotServed:
    """In place of transformers' other endpoints (responses, transcriptions, decisions): they would skip the checks."""

    async def handle_request(self, *_):
        return error(404, "this server answers /v1/chat/completions and /v1/completions", "unsupported_endpoint")


def chat_messages(body: dict) -> list[dict]:
    """The messages as the chat template takes them ({role, content} with text content); BadField naming the message
    and field that it could not take (else the template would render an unknown role, or drop an image, silently)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadField("messages", "messages must be a list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadField("messages", f"{where} must be an object with a role and a content")
        if message.get("role") not in ROLES:
            raise BadField("messages", f"{where}.role is {json.dumps(message.get('role'), ensure_ascii=False)}: this "
                                       f"model's chat template takes {', '.join(ROLES)}")
        if message.get("tool_calls"):
            raise BadField("messages", f"{where}.tool_calls: this model's chat template has no tool calls")
        content = message.get("content") or ""
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise BadField("messages", f"{where}.content[{j}] is a {json.dumps(kind)} part: this model reads "
                                               "text parts only")
            content = " ".join(part["text"] for part in content)  # as transformers joins them for a text model
        elif not isinstance(content, str):
            raise BadField("messages", f"{where}.content must be a string or a list of text parts")
        checked.append({"role": message["role"], "content": content})
    return checked


def require_api_key(app, key: str) -> None:
    """Every route but the page (which asks for the key) and /health answers 401 without `Authorization: Bearer KEY`,
    what OpenAI clients send as their api_key."""
    expected = f"Bearer {key}".encode()

    @app.middleware("http")
    async def api_key(request, call_next):
        given = request.headers.get("authorization")
        if request.url.path in ("/", "/health") or (
                given is not None and hmac.compare_digest(given.encode(), expected)):  # constant time
            return await call_next(request)
        why = "no API key" if given is None else "wrong API key"
        return error(401, f"{why}: this server needs its API key (Authorization: Bearer KEY, the openai client's "
                          "api_key)", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def build_app(served: ServedModel, device: str, dtype: str, continuous_batching: bool = False,
              limits: Limits = Limits()):
    """The FastAPI app: transformers' OpenAI endpoints with our checks and limits, and the chat page. Loads the
    model."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse
    from starlette.exceptions import HTTPException
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.utils import GenerateManager, GenerationState

    class Chat(RequestCheck, ChatCompletionHandler):
        async def check(self, body):
            if not self.served.chat:
                return error(400, f"'{self.served.name}' is a pretrained checkpoint without a chat template: it "
                                  "continues text. Send the text to /v1/completions, or fine-tune it (finetune.sh)",
                             "chat_not_supported", "messages")
            return await super().check(body)

        def prompt_text(self, body):
            messages = chat_messages(body)
            if not any(m["content"].strip() for m in messages if m["role"] == "user"):
                return ""  # nothing to answer, whatever the system prompt says
            return "".join(m["content"] for m in messages)

        def prompt_tokens(self, body, tokenizer):
            return len(tokenizer.apply_chat_template(chat_messages(body), add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])

    class Completion(RequestCheck, CompletionHandler):
        def prompt_text(self, body):
            if not isinstance(body.get("prompt"), str):
                raise BadField("prompt", "prompt must be a string")
            return body["prompt"]

        def prompt_tokens(self, body, tokenizer):
            return len(tokenizer(body["prompt"])["input_ids"])

    class Models(ModelManager):
        """transformers' model manager, which knows the model by its name and loads it from its path: the name is
        what requests, responses and /v1/models say."""

        def process_model_name(self, model_id):
            return served.name if model_id in (served.name, served.path) else super().process_model_name(model_id)

        def _load_processor(self, model_id_and_revision, gguf_file=None):
            return super()._load_processor(served.path, gguf_file)

        def _load_model(self, model_id_and_revision, *args, **kwargs):
            model = super()._load_model(served.path, *args, **kwargs)
            # transformers serve turns sampling off for temperature 0 but never on: a checkpoint saved with do_sample
            # false (what the Trainer saves) would answer every request greedily. The OpenAI API samples unless told
            # otherwise. Here, not after the first load, so that it holds for every load.
            model.generation_config.do_sample = True
            return model

    class BoundedManager(GenerateManager):
        """transformers' sequential generation, its inference thread's queue bounded."""

        def submit(self, fn, *args, **kwargs):
            return super().submit(queue.counted(fn), *args, **kwargs)

        def async_submit(self, fn, *args, **kwargs):
            return super().async_submit(queue.counted(fn), *args, **kwargs)

    class State(GenerationState):
        def get_manager(self, model_id, use_cb=False):
            # One model is served: one inference thread. Continuous batching keeps transformers' scheduler.
            return super().get_manager(model_id, use_cb) if use_cb else sequential

    # The wiring of transformers.cli.serve.Serve, which builds the same app but starts it at once (no page, no checks).
    queue, sequential = GenerationQueue(limits.max_queue), BoundedManager()
    models = Models(device=device, dtype=dtype, continuous_batching=continuous_batching, force_model=served.name)
    models.load_model_and_processor(served.name)
    state = State(continuous_batching=continuous_batching)
    chat, completion = Chat(models, state), Completion(models, state)
    for handler in (chat, completion):
        handler.served, handler.limits, handler.queue = served, limits, queue
    app = build_server(models, chat, completion_handler=completion, response_handler=NotServed(),
                       transcription_handler=NotServed(), systemone_handler=NotServed(), generation_state=state)
    # /reset unloads the model and /load_model loads any name a client sends: not for the clients of a shared server.
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ("/reset", "/load_model")]
    # FastAPI's own limit: a body declared larger is refused before it is read (a plain-text 413), a body sent in chunks
    # when its bytes pass the limit.
    app.max_body_size = limits.max_request_bytes
    if limits.api_key:
        require_api_key(app, limits.api_key)

    @app.exception_handler(QueueFull)
    async def queue_full(*_):
        return error(429, f"the server is busy: {queue.limit} generations are running or waiting, the most it "
                          f"takes; retry in {RETRY_AFTER_S} s", "queue_full",
                     headers={"Retry-After": str(RETRY_AFTER_S)})

    # transformers' own refusals (a field it does not know, ...) and unknown routes, in the error format of the rest.
    @app.exception_handler(HTTPException)
    async def http_error(_, e):
        return error(e.status_code, str(e.detail), "invalid_request", headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def not_json(_, e):
        return error(400, f"the request body must be a JSON object ({e.errors()[0]['msg']})", "invalid_request")

    page = PAGE.read_text(encoding="utf-8").replace(
        "/*SERVER*/null", json.dumps({"model": served.name, "chat": served.chat, "context": served.context,
                                      "key": bool(limits.api_key)}, ensure_ascii=False))

    @app.get("/", response_class=HTMLResponse)
    def chat_page():
        return page

    return app
