"""
Serve a TESS 2 model over HTTP: OpenAI's chat and completion API, a diffusion-native stream of the
whole answer as it forms, and a page at / that shows it denoising.

    python serve.py                                   # models/tess2-shakespeare at http://127.0.0.1:8000
    python serve.py --model hamishivi/tess2 --reward-model hamishivi/tess_mistral_rm --api-key KEY

The server loads the model once; every request goes through sample.py's reverse process, so its
answer equals `python sample.py` with the same model, prompt, seed and settings. The Engine owns the
model and knows nothing of HTTP; Api is the HTTP side (OpenAI's formats: support/serving.py).
"""
import argparse
import asyncio
import collections
import hmac
import os
import signal
import socket
import threading
import traceback
from contextlib import asynccontextmanager

import torch

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # the serving stack is optional
    raise SystemExit(f"serve.py: error: {e.name} is not installed: pip install -r requirements-serve.txt") from None

import sample
from model import ModelArgs, Transformer
from support import views
from support.cli import run_cli
from support.hub import read_config
from support.prompts import Settings, decode_row, plan, settings_for
from support.serving import (Answer, ApiError, Draft, Failed, Finished, Started, Step, api_words, envelope,
                             final_choices, new_id, parse_json, parse_request, read_body, stream_events, watched)
from support.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# The engine: requests in, step events and answers out (no HTTP here)


class Busy(Exception):
    """The engine cannot take a request now: 429 (its queue is full) or 503 (it is shutting down)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """Raised from on_step inside the reverse process: the request's rows leave at once."""


class Handle:
    """One submitted request. The engine thread publishes its events onto the asyncio loop that
    submitted it; `async for event in handle.stream()` reads them up to Finished or Failed."""

    def __init__(self, prompts, settings, batch, every, loop):
        self.prompts, self.settings, self.batch, self.every = prompts, settings, batch, every
        self.loop, self.events = loop, asyncio.Queue()
        self.cancelled, self.done = threading.Event(), False

    def publish(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening
            pass

    async def stream(self):
        while not self.done:
            event = await self.events.get()
            self.done = isinstance(event, (Finished, Failed))
            yield event


class Engine:
    """Runs requests on one model (and an optional reward model). Its whole interface, safe from any
    thread:
        handle = engine.submit(prompts, settings, every)  # ValueError: a bad request; Busy: 429/503
        async for event in handle.stream(): ...           # Started, Step (every `every` steps), then
                                                          # Finished or Failed
        engine.cancel(handle); engine.health(); engine.stop()
    This loop runs one request at a time: all its rows in one batch through sample.run, whose on_step
    publishes the steps and stops the request once it is cancelled."""

    def __init__(self, model, tokenizer, reward_model=None, max_batch=8, max_queue=64):
        self.model, self.tok, self.reward_model = model, tokenizer, reward_model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.lock, self.queue, self.stopping = threading.Condition(), collections.deque(), False
        self.counts = dict(active_rows=0, served=0, cancelled=0, failed=0)
        self.thread = threading.Thread(target=self.loop, name="engine", daemon=True)
        self.thread.start()

    def settings(self, **overrides) -> Settings:
        """The checkpoint's generation_config.json, then overrides, as sample.py builds them."""
        return settings_for(self.model.generation_config, self.model.args.max_length,
                            **{"batch_size": self.max_batch, **overrides})

    def submit(self, prompts, settings: Settings, every=None) -> Handle:
        """Queue a request: prompts (texts, used as written), row j sampled with settings.seed + j.
        Call from the asyncio loop that will read the handle."""
        if settings.eta and self.reward_model is None:
            raise ValueError("eta asks for reward guidance, but no reward model is loaded")
        batches = plan(self.tok, prompts, settings, self.model.args)  # ValueError: the prompts do not fit
        if len(prompts) > self.max_batch:
            raise ValueError(f"{len(prompts)} rows are more than the batch holds ({self.max_batch})")
        handle = Handle(prompts, settings, batches[0], every, asyncio.get_running_loop())
        with self.lock:
            if self.stopping:
                raise Busy(503, "the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise Busy(429, f"{len(self.queue)} requests are already waiting, as many as this server "
                                "queues (--max-queue); retry later")
            self.queue.append(handle)
            self.lock.notify()
        return handle

    def cancel(self, handle):
        """Its client left: a waiting request leaves the queue, a running one the batch at its next step."""
        handle.cancelled.set()
        with self.lock:
            if handle in self.queue:
                self.queue.remove(handle)
                self.counts["cancelled"] += 1
                handle.publish(Failed(499, "cancelled"))

    def health(self):
        with self.lock:
            return dict(self.counts, queued=len(self.queue), max_batch=self.max_batch, max_queue=self.max_queue)

    def stop(self):
        """Refuse new requests, fail the waiting ones and cancel the running one at its next step (each
        gets a 503); the loop then ends (join self.thread to wait for it)."""
        with self.lock:
            self.stopping = True
            for handle in self.queue:
                handle.publish(Failed(503, "the server is shutting down"))
            self.counts["cancelled"] += len(self.queue)
            self.queue.clear()
            self.lock.notify_all()

    def loop(self):
        while True:
            with self.lock:
                while not self.queue and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    return
                handle = self.queue.popleft()
                self.counts["active_rows"] = len(handle.prompts)
            outcome, event = self.run(handle)  # run catches every failure of the request
            with self.lock:
                self.counts["active_rows"] = 0
                self.counts[outcome] += 1
            handle.publish(event)

    def run(self, handle):
        """One request through sample.run -> (outcome, its last event)."""
        handle.publish(Started(len(handle.prompts)))
        every, steps = handle.every, handle.settings.steps

        def on_step(batch, n, logits, best, rows):
            if handle.cancelled.is_set() or self.stopping:
                raise Cancelled
            if every and (n % every == 0 or n == steps):
                handle.publish(Step(n, steps, self.drafts(batch, logits, best, rows)))
        try:
            gens = sample.run(self.model, self.tok, [handle.batch], handle.settings, self.reward_model, on_step)
        except Cancelled:
            why = Failed(503, "the server is shutting down") if self.stopping else Failed(499, "cancelled")
            return "cancelled", why
        except Exception as e:  # a bug or out of memory: this request fails, the server goes on
            traceback.print_exc()
            return "failed", Failed(500, f"generation failed: {type(e).__name__}: {e}")
        return "served", Finished([self.answer(handle.batch, r, g) for r, g in enumerate(gens)])

    def drafts(self, batch, logits, best, rows):
        """logits (B', L, V), best (B', L) of the running rows -> their Drafts."""
        conf = views.confidence(logits).tolist()  # (B', L) top-1 probability
        out = []
        for j, r in enumerate(rows):
            n, end = batch.lengths[r], batch.ends[r]
            row, span = best[j, :n].tolist(), batch.span_mask[r, :n].tolist()
            g = decode_row(self.tok, batch.prompts[r], row, span, end)
            where = answer_positions(row, span, end, self.tok.eos_id, self.tok.pad_id)
            out.append(Draft(r, g.text, g.tokens, [round(conf[j][i], 4) for i in where]))
        return out

    def answer(self, batch, r, g) -> Answer:
        span = batch.span_mask[r, :batch.lengths[r]]
        gaps = int(span[:batch.ends[r]].sum())
        region = batch.lengths[r] - batch.ends[r]
        ended = region == 0 or len(g.tokens) - gaps < region  # gaps only, or the region was cut short
        return Answer(g.text, g.tokens, int((~span).sum()), ended, g.steps_used)


def answer_positions(row, span, end, eos, pad):
    """The positions of decode_row's answer tokens: the gaps, then the region up to its first EOS
    with [PAD] dropped, so that [row[i] for i in answer_positions(...)] == decode_row(...).tokens."""
    tail = list(range(end, len(row)))
    cut = next((k for k, i in enumerate(tail) if row[i] == eos), len(tail))
    return [i for i in range(end) if span[i]] + [i for i in tail[:cut] if row[i] != pad]


# -----------------------------------------------------------------------------
# HTTP: OpenAI's endpoints, /health and the page


class Api:
    """The HTTP side over one Engine: OpenAI's endpoints, /health and the page. name: the model's id,
    the only one a request may ask for (compared as a string, never opened)."""

    def __init__(self, engine: Engine, name: str, api_key=None, page=""):
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


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    arg = p.add_argument
    arg("--model", default=sample.DEFAULT_MODEL, help="diffusion model: checkpoint directory or Hub id "
        f"(default: {sample.DEFAULT_MODEL} of this repository)")
    arg("--reward-model", help="reward model for guidance (requests then may set eta; default eta 0.25)")
    arg("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    arg("--port", type=int, default=8000, help="port (default 8000; 0: any free one, printed at start)")
    arg("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: no key)")
    arg("--max-batch", type=int, default=8, help="rows the engine runs at once; a request's n fits in it")
    arg("--max-queue", type=int, default=64, help="requests waiting to run; beyond it a request gets 429")
    arg("--drain", type=float, default=30.0, help="on SIGTERM, seconds given to accepted requests, then a 503")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    arg("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, float32 on cpu")
    arg("--threads", type=int, help="CPU threads (default: 1 for models under 50M parameters, else all cores)")
    return p.parse_args(argv)


def check_args(a):
    for flag, value, low in (("--port", a.port, 0), ("--max-batch", a.max_batch, 1), ("--max-queue", a.max_queue, 0),
                             ("--threads", a.threads, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if a.port > 65535:
        raise ValueError(f"--port must be at most 65535, got {a.port}")
    if a.api_key is not None and not a.api_key.strip():
        raise ValueError("--api-key is empty: pass a key, or leave the flag out to serve without one")
    if not a.drain >= 0:
        raise ValueError(f"--drain must be a number of seconds >= 0, got {a.drain}")


def load(a):
    """The checkpoints, checked as sample.py checks them before any weights load, then loaded."""
    device = sample.pick_device(a.device)
    path = sample.checkpoint_dir(a.model, "--model", sample.DEFAULT_MODEL)
    rm_path = sample.checkpoint_dir(a.reward_model, "--reward-model", sample.DEFAULT_REWARD_MODEL) \
        if a.reward_model else None
    tok, rm_tok = Tokenizer(path), Tokenizer(rm_path) if rm_path else None
    sample.check_pair(ModelArgs.from_hf(read_config(path)), tok,
                      ModelArgs.from_hf(read_config(rm_path)) if rm_path else None, rm_tok)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = Transformer.from_pretrained(path, dtype=dtype, device=device, verbose=False).eval()
    rm = Transformer.from_pretrained(rm_path, dtype=dtype, device=device, verbose=False).eval() if rm_path else None
    if device.type == "cpu":  # as sample.py: small models run fastest on one thread
        torch.set_num_threads(a.threads or (1 if model.num_params() < 50e6 else os.cpu_count()))
    return model, tok, rm


def served_name(model_arg):
    """The id a request names: the checkpoint folder's name, or the Hub id."""
    local = model_arg == sample.DEFAULT_MODEL or os.path.isdir(model_arg)
    return os.path.basename(os.path.normpath(model_arg)) if local else model_arg


class Server(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown (SIGTERM) gives the requests it accepted --drain
    seconds to finish and then has the engine cancel the rest: each of their clients gets a 503 rather
    than a cut connection."""

    def __init__(self, config, engine, drain):
        super().__init__(config)
        self.engine, self.drain = engine, drain

    async def shutdown(self, sockets=None):
        timer = asyncio.get_running_loop().call_later(self.drain, self.engine.stop)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def main(argv=None):
    a = parse_args(argv)
    check_args(a)
    try:  # the port first: a taken one fails before the weights load
        family = socket.getaddrinfo(a.host, a.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((a.host, a.port), family=family)
    except OSError as e:
        raise ValueError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e} (pass another --port or "
                         "--host)") from None
    try:
        model, tok, rm = load(a)
    except BaseException:
        sock.close()
        raise
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "page.html"), encoding="utf-8") as f:
        page = f.read()
    engine = Engine(model, tok, rm, a.max_batch, a.max_queue)
    name = served_name(a.model)
    app = Api(engine, name, a.api_key, page).app()
    host, port = sock.getsockname()[:2]
    print(f"serve.py: {name} at http://{host}:{port}/ (OpenAI API under /v1)", flush=True)
    server = Server(uvicorn.Config(app, timeout_graceful_shutdown=a.drain + 10, log_level="warning"), engine, a.drain)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler found before it: ours, so
    # that a clean shutdown exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    print(f"serve.py: stopped; {engine.health()['served']} requests served", flush=True)


if __name__ == "__main__":
    run_cli(main, "serve.py")
