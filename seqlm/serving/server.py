"""Serving a checkpoint over the OpenAI API, with a chat page, on the engine of `transformers serve`.

transformers' serving package does the work: the FastAPI app, `/v1/chat/completions` and `/v1/completions`
(streamed over server-sent events or not), `/v1/models`, `/health`, `model.generate` on one inference thread per
model (concurrent requests wait their turn; with continuous batching they share the forward passes), and the end of a
generation when its client disconnects. What this module adds, because `transformers serve` does not do it:

- checks before generating, each answered with a 400 in OpenAI's error format while the server goes on: an empty
  prompt; a prompt that, with the tokens asked for, does not fit the context (transformers would generate past
  `max_position_embeddings` without a word); a chat request to a checkpoint that only continues text (its answer
  would be noise, not a turn); a request for another model. Its other endpoints (responses, transcriptions,
  decisions) are not offered;
- sampling: requests sample (temperature 1 unless they say otherwise), as the OpenAI API does;
- a name for the model (the folder's name, not the path on this disk) in requests and `/v1/models`;
- the chat page (`seqlm/serving/web/chat.html`) at `/`, on the same app and port, so it needs no CORS and no second server.

Everything heavy (torch, the serving package) is imported inside the functions that need it, so that serve.py can
reject a busy port at once, and a bad folder before loading a model.
"""
from __future__ import annotations

import errno
import json
import socket
from dataclasses import dataclass
from pathlib import Path

from seqlm import paths

PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
# The answer length when a request sets none: transformers serve's own default, cut to what the context leaves.
DEFAULT_MAX_TOKENS = 1024


def default_checkpoint() -> str:
    """The fine-tuned model if finetune.sh has written one, else the pretrained one."""
    return str(paths.SFT_OUTPUT if paths.SFT_OUTPUT.is_dir() else paths.PRETRAIN_OUTPUT)


def cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (a port in use, an unknown address), or None: checked before the
    model is loaded, not after."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
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


def error(status: int, message: str, code: str, param: str | None = None):
    """A JSON error as the OpenAI API writes it: the openai client raises it with `message` in its text."""
    from fastapi.responses import JSONResponse

    body = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


class RequestCheck:
    """Mixed into transformers' handlers: check a request, and name the served model, before the handler runs."""

    served: ServedModel
    endpoint = ""  # the name the errors use

    def prompt_tokens(self, body: dict, tokenizer) -> int | None:
        """How many tokens the prompt is; None if it is empty."""
        raise NotImplementedError

    def check(self, body: dict):
        """An error response for a request the model cannot answer well, else None (the body is then completed)."""
        served = self.served
        if body.get("model") not in (None, served.name, served.path):
            return error(404, f"this server serves the model '{served.name}', not '{body.get('model')}'",
                         "model_not_found", "model")
        body["model"] = served.name
        for key, high in (("temperature", 2), ("top_p", 1)):  # OpenAI's ranges; out of them transformers fails: a 500
            value = body.get(key)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= high):
                return error(400, f"{key} must be a number from 0 to {high}", "invalid_value", key)
        _, tokenizer = self.model_manager.load_model_and_processor(served.name)  # loaded at start: a dict look-up
        try:
            prompt = self.prompt_tokens(body, tokenizer)
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            return error(400, f"malformed {self.endpoint} request: {e}", "invalid_request")
        if not prompt:
            return error(400, "the prompt is empty", "empty_prompt", "prompt")
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
        return self.check(body) or await super().handle_request(body, request_id)


class NotServed:
    """In place of transformers' other endpoints (responses, transcriptions, decisions): they would skip the checks."""

    async def handle_request(self, *_):
        return error(404, "this server answers /v1/chat/completions and /v1/completions", "unsupported_endpoint")


def _text(content) -> str:
    """A message's text: a string, or OpenAI's list of parts, of which the text ones count."""
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content or () if part.get("type") == "text")


def build_app(served: ServedModel, device: str, dtype: str, continuous_batching: bool = False):
    """The FastAPI app: transformers' OpenAI endpoints with our checks, and the chat page. Loads the model."""
    from fastapi.responses import HTMLResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.utils import GenerationState

    class Chat(RequestCheck, ChatCompletionHandler):
        endpoint = "chat"

        def check(self, body):
            if not self.served.chat:
                return error(400, f"'{self.served.name}' is a pretrained checkpoint without a chat template: it "
                                  "continues text. Send the text to /v1/completions, or fine-tune it (finetune.sh)",
                             "chat_not_supported", "messages")
            return super().check(body)

        def prompt_tokens(self, body, tokenizer):
            messages = [{"role": m["role"], "content": _text(m.get("content"))} for m in body["messages"]]
            if not any(m["content"].strip() for m in messages if m["role"] == "user"):
                return None
            return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])

    class Completion(RequestCheck, CompletionHandler):
        endpoint = "completion"

        def prompt_tokens(self, body, tokenizer):
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise TypeError("prompt must be a string")
            return len(tokenizer(prompt)["input_ids"]) if prompt.strip() else None

    class Models(ModelManager):
        """transformers' model manager, which knows the model by its name and loads it from its path: the name is
        what requests, responses and /v1/models say."""

        def process_model_name(self, model_id):
            return served.name if model_id in (served.name, served.path) else super().process_model_name(model_id)

        def _load_processor(self, model_id_and_revision, gguf_file=None):
            return super()._load_processor(served.path, gguf_file)

        def _load_model(self, model_id_and_revision, *args, **kwargs):
            return super()._load_model(served.path, *args, **kwargs)

    # The wiring of transformers.cli.serve.Serve, which builds the same app but starts it at once (no page, no checks).
    models = Models(device=device, dtype=dtype, continuous_batching=continuous_batching, force_model=served.name)
    # transformers serve turns sampling off for temperature 0 but never on: a checkpoint saved with do_sample false
    # (what the Trainer saves) would answer every request greedily. The OpenAI API samples unless told otherwise.
    models.load_model_and_processor(served.name)[0].generation_config.do_sample = True
    state = GenerationState(continuous_batching=continuous_batching)
    chat, completion = Chat(models, state), Completion(models, state)
    chat.served = completion.served = served
    app = build_server(models, chat, completion_handler=completion, response_handler=NotServed(),
                       transcription_handler=NotServed(), systemone_handler=NotServed(), generation_state=state)

    page = PAGE.read_text(encoding="utf-8").replace(
        "/*SERVER*/null", json.dumps({"model": served.name, "chat": served.chat, "context": served.context},
                                     ensure_ascii=False))

    @app.get("/", response_class=HTMLResponse)
    def chat_page():
        return page

    return app
