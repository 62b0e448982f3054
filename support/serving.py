"""
serve.py's HTTP side that a student may skip: the events the Engine publishes for a request,
OpenAI's request bodies read and checked (a chat's messages become the prompt that sample.generate
takes for a chat, rendered by support/prompts.encode_prompt), answers written back as OpenAI's JSON
and Server-Sent Events, and Api, the Starlette app over an Engine (OpenAI's endpoints, /health and
the page). Nothing here touches the model; serve.py's Engine does.

Every mistake in a request is an ApiError, answered in OpenAI's error format
{"error": {"message", "type", "param", "code"}}.
"""
import asyncio
import hmac
import json
import math
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from support import views
from support.prompts import GAP, SAMPLERS, check_chat, gap_size

MAX_BODY = 1 << 20  # bytes: a request body is JSON text, never a file
MAX_STEPS = 10_000  # steps beyond this are a typo (the released evaluation takes 100), not a request to honour
MAX_GUIDANCE_STEPS = 100
MAX_SEED = 1 << 62  # seeds of a request's rows (seed + row) stay inside torch.Generator's range


class ApiError(Exception):
    def __init__(self, status, message, param=None, type="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Busy(Exception):
    """The engine cannot take a request now: 429 (its queue is full) or 503 (it is shutting down)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


@dataclass
class ApiRequest:
    """What a chat or completion request asks for, checked: the prompts (a completion's texts, used as
    written; a chat's messages, rendered in the chat template as sample.generate renders a chat), the
    Settings fields it overrides, and how to answer."""
    kind: str  # "chat" or "completion"
    prompts: list  # prompts, each repeated n times: row j is prompt j // n, seed + j
    n: int
    overrides: dict  # Settings fields (steps, top_p, length, total_length, seed, eta, guidance_steps, ...)
    stop: list = field(default_factory=list)
    stream: bool = False
    every: int | None = None  # the diffusion-native stream: an event every `every` steps
    include_usage: bool = False


# -----------------------------------------------------------------------------
# What serve.py's Engine tells the HTTP side: the events of a request


@dataclass
class Draft:
    """A running row after a step: the answer sample.py would return if it stopped here."""
    index: int  # the row's place in its request
    text: str
    tokens: list  # the answer's ids (decode_row: the gaps, then the region cut at its first EOS)
    confidence: list  # each of those tokens' top-1 probability at this step


@dataclass
class Answer:
    text: str
    tokens: list
    prompt_tokens: int  # context positions, BOS included
    ended: bool  # the model ended its answer (EOS or [PAD]) before the row's last position, or it had gaps only
    steps_used: int


@dataclass
class Started:  # the request's rows joined the batch
    rows: int


@dataclass
class Step:  # after diffusion step n of steps, for the rows still running
    n: int
    steps: int
    drafts: list


@dataclass
class Finished:
    answers: list  # one Answer per row, in order


@dataclass
class Failed:
    status: int  # 499: its client left; 503: the server is shutting down; 500: a bug
    message: str


# -----------------------------------------------------------------------------
# Reading a request, watching its client


async def read_body(request):
    size = request.headers.get("content-length", "")
    if size.isdigit() and (len(size) > 9 or int(size) > MAX_BODY):
        raise ApiError(413, f"the body has {size} bytes; this server takes at most {MAX_BODY}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the body is over {MAX_BODY} bytes, the most this server takes")
    return body


async def watched(request, engine, handle):
    """The handle's events; a client that disconnects cancels its request at once."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        engine.cancel(handle)
    watcher = asyncio.create_task(watch())
    try:
        async for event in handle.stream():
            yield event
    finally:
        watcher.cancel()
        if not handle.done:
            engine.cancel(handle)


def api_words(message):
    """A Settings or row-planning message speaks of sample.py's flags; a request has fields."""
    for flag, name in (("--total-length", "total_length"), ("--length", "max_tokens"), ("--top-p", "top_p")):
        message = message.replace(flag, name)
    return message



def parse_json(body: bytes):
    """Strict JSON: NaN and Infinity are not JSON (Python's json would take them), nor is a number
    too large for a float."""
    def refuse(word):
        raise ApiError(400, f"the body is not valid JSON: {word} is not a JSON number")
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=refuse)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" alone parses, but is no text a tokenizer takes
        raise ApiError(400, "the body holds a lone UTF-16 surrogate (such as \\ud800): not text") from None
    return obj


def whole(body, name, low, high, default=None):
    """An integer field in [low, high] (a bool is not a number here, unlike in Python)."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a whole number from {low} to {high}, got {json.dumps(value)}", name)
    return value


def number(body, name, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must be a number in {span}, got {json.dumps(value)}", name)
    return float(value)


def flag(body, name, default=False):
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def texts(value, name, allow_list=True):
    """A string, or (allow_list) a non-empty list of strings -> list of str."""
    if isinstance(value, str):
        return [value]
    if allow_list and isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return value
    raise ApiError(400, f"'{name}' must be a string{' or a list of strings' if allow_list else ''}", name)


# -----------------------------------------------------------------------------
# Chat: OpenAI's messages -> the chat prompt of support/prompts.encode_prompt (the Tulu template, §8)


def content_text(message, j):
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{j}].content must be a string (or a list of text parts)", "messages")
    return content


def chat_prompt(messages):
    """OpenAI messages -> the chat a row is made of: [{"role", "content"}] with string contents, which
    support/prompts.encode_prompt renders in the Tulu template, every turn as in training, as it does
    for sample.generate and a --prompts-file chat (one user message: exactly sample.py --prompt)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    chat = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{j}] must be an object whose role is system, user or assistant",
                           "messages")
        chat.append({"role": m["role"], "content": content_text(m, j)})
    try:
        check_chat(chat)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from None
    return chat


# -----------------------------------------------------------------------------
# A whole request


COMMON = {"model", "max_tokens", "seed", "top_p", "n", "stream", "stream_options", "stop", "user",
          "steps", "eta", "guidance_steps", "argmax", "early_exit", "total_length", "shed", "sampler"}


def check_fields(body, kind):
    allowed = COMMON | ({"messages", "max_completion_tokens"} if kind == "chat" else {"prompt"})
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field '{unknown[0]}': this server reads {', '.join(sorted(allowed))}",
                       unknown[0])
    prompt_field = "messages" if kind == "chat" else "prompt"
    if prompt_field not in body:
        raise ApiError(400, f"'{prompt_field}' is required", prompt_field)


def diffusion_settings(body, max_length, reward_model):
    """The Settings fields a request overrides; fields left out keep the checkpoint's defaults."""
    s = {"steps": whole(body, "steps", 1, MAX_STEPS), "seed": whole(body, "seed", 0, MAX_SEED),
         "guidance_steps": whole(body, "guidance_steps", 1, MAX_GUIDANCE_STEPS),
         "early_exit": whole(body, "early_exit", 1, MAX_STEPS),
         "total_length": whole(body, "total_length", 1, max_length),
         "eta": number(body, "eta", 0.0, 1e6), "shed": whole(body, "shed", 1, MAX_STEPS)}
    if body.get("sampler") is not None and body["sampler"] not in SAMPLERS:
        raise ApiError(400, f"'sampler' must be one of {', '.join(SAMPLERS)}, got {json.dumps(body['sampler'])[:80]}",
                       "sampler")
    s["sampler"] = body.get("sampler")
    tokens = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    s["length"] = whole(body, tokens, 1, max_length)
    s["top_p"] = number(body, "top_p", 0.0, 1.0, low_open=True)
    if s["eta"] and not reward_model:
        raise ApiError(400, "'eta' asks for reward guidance, but this server has no reward model "
                       "(start it with --reward-model)", "eta")
    overrides = {k: v for k, v in s.items() if v is not None}
    if flag(body, "argmax"):
        if "top_p" in overrides:
            raise ApiError(400, "'argmax' and 'top_p' exclude each other: argmax projects without sampling",
                           "argmax")
        overrides["top_p"] = None  # sample.py --argmax
    return overrides


def stream_fields(body, request: ApiRequest):
    request.stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return
    if not request.stream or not isinstance(options, dict):
        raise ApiError(400, "'stream_options' is an object, and only with \"stream\": true", "stream_options")
    unknown = sorted(set(options) - {"include_usage", "diffusion", "every"})
    if unknown:
        raise ApiError(400, f"unknown stream option '{unknown[0]}': include_usage, diffusion, every",
                       "stream_options")
    request.include_usage = flag(options, "include_usage")
    if flag(options, "diffusion"):
        request.every = whole(options, "every", 1, MAX_STEPS, default=1)
    elif "every" in options:
        raise ApiError(400, "'every' belongs to the diffusion stream: add \"diffusion\": true", "stream_options")


def check_gaps(prompts, max_length, param):
    """Each <mask:N> gap is well formed (support.prompts.gap_size) and the gaps fit in the model: a row's
    gap positions are laid out before its length is checked."""
    for prompt in prompts:
        try:
            sizes = [gap_size(spec, prompt, max_length) for spec in GAP.findall(prompt)]
        except ValueError as e:
            raise ApiError(400, str(e), param) from None
        if sum(sizes) > max_length:
            raise ApiError(400, f"the <mask:N> gaps of a prompt ask for {sum(sizes)} positions, more than the "
                           f"model reads ({max_length})", param)


def parse_request(body: dict, kind: str, model_name: str, max_length: int, max_batch: int, reward_model: bool,
                  chat_template: bool = True) -> ApiRequest:
    """A checked chat ("chat") or completion ("completion") request. model_name is compared as a
    string, never opened: a request cannot name a file for the server to read."""
    check_fields(body, kind)
    model = body.get("model", model_name)
    if model != model_name:
        raise ApiError(400, f"unknown model {json.dumps(model)[:80]}: this server serves '{model_name}' "
                       "(GET /v1/models)", "model", code="model_not_found")
    if kind == "chat" and not chat_template:
        raise ApiError(400, "this checkpoint has no chat template: use /v1/completions", "messages")
    prompts = [chat_prompt(body["messages"])] if kind == "chat" else texts(body["prompt"], "prompt")
    if kind == "completion":
        check_gaps(prompts, max_length, "prompt")
    n = whole(body, "n", 1, max_batch, default=1)
    if n * len(prompts) > max_batch:
        raise ApiError(400, f"{len(prompts)} prompts x n = {n} make {n * len(prompts)} rows, but a request "
                       f"may fill at most the server's batch of {max_batch} (--max-batch)", "n")
    stop = [] if body.get("stop") is None else texts(body["stop"], "stop")
    if len(stop) > 4 or not all(stop):
        raise ApiError(400, "'stop' takes up to 4 non-empty strings", "stop")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", "user")
    request = ApiRequest(kind, [p for p in prompts for _ in range(n)], n,
                         diffusion_settings(body, max_length, reward_model), stop)
    stream_fields(body, request)
    return request


# -----------------------------------------------------------------------------
# Answers: OpenAI's objects and Server-Sent Events


def cut_at_stop(text, stop):
    """The text up to the first stop string, and whether one was found."""
    hits = [text.find(s) for s in stop if s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def new_id(kind):
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def envelope(kind, rid, model, chunk=False):
    obj = {"chat": "chat.completion", "completion": "text_completion"}[kind] + (".chunk" if chunk and kind == "chat"
                                                                                 else "")
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model}


def final_choices(kind, answers, stop):
    """answers: the Engine's, one per row -> OpenAI choices (text cut at a stop string) and usage."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for j, a in enumerate(answers):
        text, stopped = cut_at_stop(a.text, stop)
        reason = "stop" if stopped or a.ended else "length"
        body = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text}
        choices.append({"index": j, **body, "logprobs": None, "finish_reason": reason})
        prompt_tokens += a.prompt_tokens
        completion_tokens += len(a.tokens)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return choices, usage


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def chunk_choice(kind, index, text=None, role=False, finish_reason=None):
    """One choice of a streamed chunk: chat deltas, or completion text pieces."""
    if kind == "completion":
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


async def stream_events(events, req, rid, name, tok):
    """SSE: OpenAI's chunks (the role when the rows start, each answer and its finish_reason at the
    end); or, with stream_options.diffusion, a diffusion.step event every `every` steps (each row's
    whole current text, its tokens and their confidence), then the ordinary completion object."""
    kind, head, cache = req.kind, lambda: envelope(req.kind, rid, name, chunk=True), {}
    async for event in events:
        if isinstance(event, Started) and not req.every:
            yield sse({**head(), "choices": [chunk_choice(kind, j, role=True) for j in range(len(req.prompts))]})
        elif isinstance(event, Step):
            rows = [dict(index=d.index, text=d.text, tokens=views.pieces(tok, d.tokens, cache),
                         confidence=d.confidence) for d in event.drafts]
            yield sse({**head(), "object": "diffusion.step", "step": event.n, "steps": event.steps, "choices": rows})
        elif isinstance(event, Failed):
            yield sse(ApiError(event.status, event.message, type="server_error").body())
        elif isinstance(event, Finished):
            choices, usage = final_choices(kind, event.answers, req.stop)
            if req.every:
                yield sse({**envelope(kind, rid, name), "choices": choices, "usage": usage})
            else:
                for c in choices:
                    text = c["text"] if kind == "completion" else c["message"]["content"]
                    yield sse({**head(), "choices": [chunk_choice(kind, c["index"], text)]})
                    yield sse({**head(), "choices": [chunk_choice(kind, c["index"], finish_reason=c["finish_reason"])]})
                if req.include_usage:
                    yield sse({**head(), "choices": [], "usage": usage})
    yield SSE_DONE


# -----------------------------------------------------------------------------
# The app: OpenAI's endpoints, /health and the page, over serve.py's Engine


class Api:
    """The HTTP side over one Engine: OpenAI's endpoints, /health and the page. name: the model's id,
    the only one a request may ask for (compared as a string, never opened)."""

    def __init__(self, engine, name: str, api_key=None, page=""):
        self.engine, self.name, self.api_key, self.page = engine, name, api_key, page
        self.defaults = engine.settings()

    def app(self):
        routes = [Route("/", self.index), Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completion, methods=["POST"])]
        return Starlette(routes=routes, lifespan=self.lifespan,
                         exception_handlers={ApiError: self.error, HTTPException: self.error, Exception: self.error})

    @asynccontextmanager
    async def lifespan(self, app):
        yield
        self.engine.stop()  # after the drain (Server.shutdown): nothing runs any more
        await asyncio.to_thread(self.engine.thread.join)

    def authorize(self, request):
        given = request.headers.get("authorization", "").encode()
        if self.api_key and not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def chat(self, request):
        return await self.complete(request, "chat")

    async def completion(self, request):
        return await self.complete(request, "completion")

    async def complete(self, request, kind):
        self.authorize(request)
        engine, name = self.engine, self.name
        req = parse_request(parse_json(await read_body(request)), kind, name, engine.model.args.max_length,
                            engine.max_batch, engine.reward_model is not None, self.defaults.chat)
        try:
            handle = engine.submit(req.prompts, engine.settings(chat=False, **req.overrides), req.every)
        except ValueError as e:
            message = api_words(str(e))
            raise ApiError(400, message, "max_tokens" if "max_tokens" in message else None) from None
        except Busy as e:
            raise ApiError(e.status, str(e), type="server_busy" if e.status == 429 else "server_error") from None
        events, rid = watched(request, engine, handle), new_id(kind)
        if req.stream:
            return StreamingResponse(stream_events(events, req, rid, name, engine.tok), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for event in events:
            pass
        if isinstance(event, Failed):
            raise ApiError(event.status, event.message, type="server_error")
        choices, usage = final_choices(kind, event.answers, req.stop)
        return JSONResponse({**envelope(kind, rid, name), "choices": choices, "usage": usage})

    async def index(self, request):
        return HTMLResponse(self.page)

    async def health(self, request):
        d = self.defaults
        return JSONResponse({"status": "ok", "model": self.name, "reward_model": self.engine.reward_model is not None,
                             "auth": bool(self.api_key), "max_length": self.engine.model.args.max_length,
                             "defaults": {"steps": d.steps, "top_p": d.top_p, "total_length": d.total_length},
                             **self.engine.health()})

    async def models(self, request):
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                                         "owned_by": "tess2"}]})

    async def error(self, request, e):
        if isinstance(e, HTTPException):
            e = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}")
        elif not isinstance(e, ApiError):
            traceback.print_exception(e)
            e = ApiError(500, f"internal error: {type(e).__name__}", type="server_error")
        return JSONResponse(e.body(), e.status, headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
