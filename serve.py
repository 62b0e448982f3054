"""
Serve a TESS 2 model over HTTP: OpenAI's chat and completion API, a diffusion-native stream of the
whole answer as it forms, and a page at / that shows it denoising.

    python serve.py                                   # models/tess2-shakespeare at http://127.0.0.1:8000
    python serve.py --model hamishivi/tess2 --reward-model hamishivi/tess_mistral_rm --api-key KEY

The server loads the model once. Its Engine runs one batch by continuous batching: requests join
the running batch between two diffusion steps and leave it when done, each row at its own step and
with its own settings, through sample.py's reverse process (sample.start, join, step, leave). So a
request's answer equals `python sample.py` with the same model, prompt, seed and settings, whatever
else runs. The Engine owns the model and knows nothing of HTTP; support/serving.py's Api is the HTTP
side (OpenAI's endpoints and formats, the page, /health).
"""
import asyncio
import collections
import dataclasses
import os
import signal
import socket
import threading
import traceback
import types

import torch

try:
    import uvicorn

    from support.serving import Answer, Api, Busy, Draft, Failed, Finished, Started, Step
except ImportError as e:  # the serving stack is optional
    raise SystemExit(f"serve.py: error: {e.name} is not installed: pip install -r requirements-serve.txt") from None

import sample
from model import ModelArgs, Transformer
from support import fused_sampling, views
from support.cli import ArgumentParser, number, run_cli
from support.hub import read_config
from support.prompts import GUIDANCE_ETA, Settings, decode_row, pick_device, plan, settings_for
from support.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# The engine: requests in, step events and answers out (no HTTP here)


class Handle:
    """One submitted request. The engine thread publishes its events onto the asyncio loop that
    submitted it; `async for event in handle.stream()` reads them up to Finished or Failed."""

    def __init__(self, prompts, settings, batch, every, guided, loop):
        self.prompts, self.settings, self.batch, self.every = prompts, settings, batch, every
        self.guided = guided  # its rows' guidance (eta, guidance_steps, tau), or None: unguided
        self.answers = [None] * len(prompts)  # each row's Answer, as it finishes
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
    """Runs requests on one model (and an optional reward model) by continuous batching. Its whole
    interface, safe from any thread:
        handle = engine.submit(prompts, settings, every)  # ValueError: a bad request; Busy: 429/503
        async for event in handle.stream(): ...           # Started, Step (every `every` steps), then
                                                          # Finished or Failed
        engine.cancel(handle); engine.health(); engine.stop()
    One thread runs one batch (sample.Denoising, keyed by (handle, row of its request)): each
    iteration, cancelled requests' rows leave it, waiting requests join it while their rows fit in
    max_batch, and sample.step moves every row one diffusion step on, each at its own timestep with
    its own seed, steps, top_p, early exit, length, sampler and shedding. A row attends only to itself and draws from
    its own generator, so its answer is the one sample.py gives it, whatever else runs beside it."""

    def __init__(self, model, tokenizer, reward_model=None, max_batch=8, max_queue=64):
        self.model, self.tok, self.reward_model = model, tokenizer, reward_model
        self.max_batch, self.max_queue, self.device = max_batch, max_queue, model.embed_tokens.weight.device
        self.lock, self.queue, self.stopping = threading.Condition(), collections.deque(), False
        self.running = []  # the requests with rows in the batch (the engine thread's own)
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
        s = settings
        guided = self.reward_model is not None and (s.eta is None or s.eta > 0)  # as sample.run decides
        key = (GUIDANCE_ETA if s.eta is None else s.eta, s.guidance_steps, s.tau) if guided else None
        handle = Handle(prompts, s, batches[0], every, key, asyncio.get_running_loop())
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
        """Its client left: a waiting request leaves the queue, a running one the batch before the next step."""
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
        """Refuse new requests, fail the waiting ones and cancel the running ones before the next step
        (each gets a 503); the loop then ends (join self.thread to wait for it)."""
        with self.lock:
            self.stopping = True
            for handle in self.queue:
                handle.publish(Failed(503, "the server is shutting down"))
            self.counts["cancelled"] += len(self.queue)
            self.queue.clear()
            self.lock.notify_all()

    # the engine thread

    def loop(self):
        state = None  # the batch (sample.Denoising), None while it is empty
        guide = self.guide if self.reward_model is not None else None
        while self.wait(state):
            try:
                state = self.admit(state)
                finished = [] if state is None else sample.step(self.model, state, guide, self.on_step)
            except Exception as e:  # a bug or out of memory: the batch's requests fail, the server goes on
                traceback.print_exc()
                state = self.drop(None, self.running, Failed(500, f"generation failed: {type(e).__name__}: {e}"),
                                  "failed")
                continue
            for (handle, r), tokens, steps_used in finished:
                handle.answers[r] = self.answer(handle.batch, r, tokens, steps_used)
                if all(a is not None for a in handle.answers):
                    self.end(handle, "served", Finished(handle.answers))
            state = trim(state) if state is not None and state.keys else None
            self.count_rows(state)
        self.drop(state, self.running, Failed(503, "the server is shutting down"), "cancelled")

    def wait(self, state):
        """Blocks while the batch and the queue are empty. -> False once stopping."""
        with self.lock:
            while state is None and not self.queue and not self.stopping:
                self.lock.wait()
            return not self.stopping

    def admit(self, state):
        """Before a step: the rows of cancelled requests leave, waiting requests join in their order
        while their rows fit (a request waits for room rather than be passed). -> the batch, or None."""
        state = self.drop(state, [h for h in self.running if h.cancelled.is_set()], Failed(499, "cancelled"),
                          "cancelled")
        joining, room = [], self.max_batch - (len(state.keys) if state else 0)
        with self.lock:
            while self.queue and len(self.queue[0].prompts) <= room:
                joining.append(self.queue.popleft())
                room -= len(joining[-1].prompts)
        for handle in joining:
            self.running.append(handle)  # from here on, a failure ends it with the batch's others
            b, s, dev = handle.batch, handle.settings, self.device
            rows = sample.start(b.ids.to(dev), b.span_mask.to(dev), b.seeds, self.model.args.vocab_size, s.steps,
                                s.top_p, s.early_exit, b.lengths, [(handle, r) for r in range(len(b.prompts))],
                                s.sampler, s.shed, self.tok.pad_id if s.shed else None)
            if state is None:
                state = rows
            else:
                sample.join(state, rows)
            handle.publish(Started(len(b.prompts)))
        self.count_rows(state)
        return state

    def drop(self, state, handles, event, outcome):
        """The rows of `handles` leave the batch at once, and each request ends with `event`. -> the batch,
        or None once it is empty (state None: the batch is lost, after a failure)."""
        handles = list(handles)
        if state is not None and handles:
            sample.leave(state, [b for b, (handle, _) in enumerate(state.keys) if handle in handles])
        for handle in handles:
            self.end(handle, outcome, event)
        state = trim(state) if state is not None and state.keys else None
        self.count_rows(state)
        return state

    def end(self, handle, outcome, event):
        self.running.remove(handle)
        with self.lock:
            self.counts[outcome] += 1
        handle.publish(event)

    def count_rows(self, state):
        with self.lock:
            self.counts["active_rows"] = len(state.keys) if state is not None else 0

    def guide(self, logits, state):
        """Reward guidance for `step`: the rows that ask for it, grouped by (eta, guidance_steps, tau),
        each group guided by sample.reward_guide as one batch of sample.run is; the other rows keep
        their logits. logits (B, L, V) -> (B, L, V), fp32 as reward guidance gives it."""
        groups = collections.defaultdict(list)  # (eta, guidance_steps, tau) -> the batch's rows that use them
        for b, (handle, _) in enumerate(state.keys):
            if handle.guided is not None:
                groups[handle.guided].append(b)
        for rows in groups.values():
            logits = logits.float()  # a no-op for fp32 logits
            group = types.SimpleNamespace(ids=state.ids[rows], span_mask=state.span_mask[rows],
                                          lengths=[state.lengths[b] for b in rows])  # what the guide reads
            s = state.keys[rows[0]][0].settings
            guide = sample.reward_guide(self.reward_model, s, group.ids.numel(), self.model.args.vocab_size,
                                        self.device)
            logits[rows] = guide(logits[rows], group)
        return logits

    def on_step(self, state):
        """After each step, before finished rows leave: a Step event for each request that streams the
        diffusion, every `every` of its steps and at its last."""
        streaming = collections.defaultdict(list)  # handle -> [(its row's place in the batch, its row)]
        for b, (handle, r) in enumerate(state.keys):
            if handle.every:
                streaming[handle].append((b, r))
        for handle, rows in streaming.items():
            n, steps = state.taken[rows[0][0]], handle.settings.steps
            if n % handle.every == 0 or n == steps:
                handle.publish(Step(n, steps, [self.draft(handle.batch, r, state, b) for b, r in rows]))

    def draft(self, batch, r, state, b):
        """Row r of a request, row b of the batch -> its Draft: the answer if it stopped here. A row that
        has shed its tail has no prediction there: its answer (cut at EOS, [PAD] dropped) lies before it."""
        n, end = batch.lengths[r], batch.ends[r]
        row, span = fused_sampling.row_tokens(state, b).tolist(), batch.span_mask[r, :n].tolist()
        g = decode_row(self.tok, batch.prompts[r], row, span, end)
        where = answer_positions(row, span, end, self.tok.eos_id, self.tok.pad_id)
        conf = views.confidence(state.logits[b:b + 1, :state.lengths[b]])[0].tolist()  # top-1 probability
        return Draft(r, g.text, g.tokens, [round(conf[i], 4) for i in where])

    def answer(self, batch, r, tokens, steps_used) -> Answer:
        """Row r of a request, finished: tokens (L,) as sample.step returns them -> its Answer, decoded as
        sample.run decodes a row."""
        n, end = batch.lengths[r], batch.ends[r]
        span = batch.span_mask[r, :n]
        g = decode_row(self.tok, batch.prompts[r], tokens[:n].tolist(), span.tolist(), end)
        gaps, region = int(span[:end].sum()), n - end
        ended = region == 0 or len(g.tokens) - gaps < region  # gaps only, or the region was cut short
        return Answer(g.text, g.tokens, int((~span).sum()), ended, steps_used)


def trim(state):
    """The padding no row needs any more (the longest rows left) goes: each row computes as it did,
    on fewer positions. Every tensor of a Denoising is (B, L, ...), as sample.join pads them."""
    L = max(state.lengths)
    if L < state.ids.shape[1]:
        for f in dataclasses.fields(state):
            x = getattr(state, f.name)
            if isinstance(x, torch.Tensor):
                setattr(state, f.name, x[:, :L].contiguous())
    return state


def answer_positions(row, span, end, eos, pad):
    """The positions of decode_row's answer tokens: the gaps, then the region up to its first EOS
    with [PAD] dropped, so that [row[i] for i in answer_positions(...)] == decode_row(...).tokens."""
    tail = list(range(end, len(row)))
    cut = next((k for k, i in enumerate(tail) if row[i] == eos), len(tail))
    return [i for i in range(end) if span[i]] + [i for i in tail[:cut] if row[i] != pad]


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0].strip())
    arg = p.add_argument
    arg("--model", default=sample.DEFAULT_MODEL, help="diffusion model: checkpoint directory or Hub id "
        f"(default: {sample.DEFAULT_MODEL} of this repository)")
    arg("--reward-model", help="reward model for guidance (requests then may set eta; default eta 0.25)")
    arg("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    arg("--port", type=number(int, lo=0, hi=65535), default=8000, help="port (default 8000; 0: any free one, printed at start)")
    arg("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: no key)")
    arg("--max-batch", type=number(int, lo=1), default=8, help="rows in the running batch (a request's prompts x n fit in it); a "
        "request waits in the queue until its rows fit")
    arg("--max-queue", type=number(int, lo=0), default=64, help="requests waiting for room in the batch; beyond it, a 429")
    arg("--drain", type=number(float, lo=0), default=30.0, help="on SIGTERM, seconds given to accepted requests, then a 503")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    arg("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, float32 on cpu")
    arg("--threads", type=number(int, lo=1), help="CPU threads (default: 1 for models under 50M parameters, else all cores)")
    return p.parse_args(argv)


def check_args(a):
    if a.api_key is not None and not a.api_key.strip():
        raise ValueError("--api-key is empty: pass a key, or leave the flag out to serve without one")


def load(a):
    """The checkpoints, checked as sample.py checks them before any weights load, then loaded."""
    device = pick_device(a.device)
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
