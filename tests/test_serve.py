"""
serve.py: the shipped miniature behind OpenAI's API on a free loopback port (a live server, started
as a subprocess), driven by the stock `openai` client, by raw HTTP and by a real headless Chromium.
Its answers are checked against sample.py (the command line, and sample.generate in this process).
Needs requirements-serve.txt (skipped without it).
"""
import collections
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the serving tests need requirements-serve.txt")
pytest.importorskip("starlette", reason="the serving tests need requirements-serve.txt")
pytest.importorskip("uvicorn", reason="the serving tests need requirements-serve.txt")

import sample
import serve
from model import Transformer
from support import serving
from support.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, sample.DEFAULT_MODEL)
KEY = "test-key"
QUICK = dict(steps=12, max_tokens=24)  # a short answer: ~0.2 s on one thread
BRUTUS = "Continue this speech by Brutus from Julius Caesar:\nRomans, countrymen, and lovers! hear me for my cause,"


# -----------------------------------------------------------------------------
# A live server and what talks to it


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python serve.py --port P FLAGS` in a subprocess, ready once /health answers."""

    def __init__(self, tmp_path, *flags):
        self.port, self.log = free_port(), open(tmp_path / "server.log", "w+")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--port", str(self.port), *flags],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while True:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                pytest.fail(f"serve.py did not start:\n{self.output()}")
            time.sleep(0.2)

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def connect(self, timeout=60):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path):
        c = self.connect(5)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    def health(self):
        return json.loads(self.get("/health")[1])

    def idle(self, timeout=30):
        """Wait until no row runs and none waits: what earlier tests left (a row cancelled at its next
        step, say) must not count in a test that reads the counters. -> the health then."""
        deadline = time.time() + timeout
        while (health := self.health())["active_rows"] or health["queued"]:
            assert time.time() < deadline, f"the server is still busy: {health}"
            time.sleep(0.05)
        return health

    def post(self, path, body, key=KEY, timeout=60):
        """-> (status, JSON body); body: a dict, or raw bytes sent as they are."""
        c = self.connect(timeout)
        try:
            c.request("POST", path, body if isinstance(body, bytes) else json.dumps(body), headers=auth(key))
            r = c.getresponse()
            return r.status, json.loads(r.read())
        finally:
            c.close()

    def open_stream(self, path, body, key=KEY):
        """-> (connection, response) of a streamed request; read it with events()."""
        c = self.connect()
        c.request("POST", path, json.dumps({**body, "stream": True}), headers=auth(key))
        return c, c.getresponse()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def auth(key):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def events(response):
    """Server-Sent Events -> their JSON objects, up to [DONE]."""
    for line in response:
        line = line.decode().rstrip("\n")
        if line == "data: [DONE]":
            return
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"), "--api-key", KEY, "--max-batch", "8", "--max-queue", "16")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oracle():
    """sample.generate on the same checkpoint in this process: prompt j of a call gets seed + j."""
    model, tok = Transformer.from_pretrained(MODEL, verbose=False).eval(), Tokenizer(MODEL)

    def expected(prompts, steps, max_tokens, seed=0, chat=True, **settings):
        return sample.generate(model, tok, prompts, steps=steps, length=max_tokens, seed=seed, chat=chat, **settings)
    return expected


def name(server):
    return server.health()["model"]


# -----------------------------------------------------------------------------
# Answers equal sample.py's


@pytest.mark.slow
def test_a_chat_answer_equals_the_sample_py_command(server, client):
    prompt = "Who says this in Hamlet?\nTo be, or not to be: that is the question"
    cli = subprocess.run([sys.executable, "sample.py", "--prompt", prompt, "--steps", "12", "--length", "24",
                          "--seed", "3", "--json"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    want = json.loads(cli.stdout)["text"]
    got = client.chat.completions.create(model=name(server), messages=[{"role": "user", "content": prompt}],
                                         seed=3, max_tokens=24, extra_body={"steps": 12})
    assert got.choices[0].message.content == want


def test_chat_choices_are_sample_py_rows_with_seed_plus_j(server, client, oracle):
    prompt = "Speak of the sea."
    got = client.chat.completions.create(model=name(server), messages=[{"role": "user", "content": prompt}],
                                         seed=5, n=2, max_tokens=24, extra_body={"steps": 12})
    assert [c.message.content for c in got.choices] == oracle([prompt, prompt], seed=5, **QUICK)
    assert [c.index for c in got.choices] == [0, 1] and got.object == "chat.completion"
    assert all(c.finish_reason in ("stop", "length") for c in got.choices)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # each row: BOS + "<|user|>\n" + the prompt + "\n<|assistant|>\n", tokenized as sample.py does
    tok = Tokenizer(MODEL)
    assert got.usage.prompt_tokens == 2 * (1 + len(tok.encode(f"<|user|>\n{prompt}\n<|assistant|>\n")))


def test_completion_takes_the_prompt_as_written_and_fills_gaps(server, client, oracle):
    prompts = ["ROMEO.\nBut soft, what light", "To be, or <mask:3> be"]
    got = client.completions.create(model=name(server), prompt=prompts, seed=2, max_tokens=24,
                                    extra_body={"steps": 12, "argmax": True})
    want = oracle(prompts, seed=2, chat=False, top_p=None, **QUICK)
    assert [c.text for c in got.choices] == want
    assert got.choices[1].text.startswith("To be, or") and got.object == "text_completion"


def test_argmax_and_top_p_reach_the_reverse_process(server, client, oracle):
    messages, want = [{"role": "user", "content": "Speak of the sea."}], "Speak of the sea."
    got = client.chat.completions.create(model=name(server), messages=messages, max_tokens=24, seed=1,
                                         extra_body={"steps": 12, "argmax": True})
    assert got.choices[0].message.content == oracle([want], seed=1, top_p=None, **QUICK)[0]
    got = client.chat.completions.create(model=name(server), messages=messages, max_tokens=24, seed=1, top_p=0.5,
                                         extra_body={"steps": 12})
    assert got.choices[0].message.content == oracle([want], seed=1, top_p=0.5, **QUICK)[0]


def test_a_multi_turn_chat_is_the_prompt_generate_takes(server, client, oracle):
    """Every turn in the template as in training (data.chat.encode_chat_prompt), as sample.generate
    renders a list of messages: the same answer, and the prompt's tokens laid out literally."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Hamlet?"},
                {"role": "assistant", "content": "A prince."}, {"role": "user", "content": "Of where?"}]
    got = client.chat.completions.create(model=name(server), messages=messages, seed=3, max_tokens=24,
                                         extra_body={"steps": 12})
    assert got.choices[0].message.content == oracle([messages], seed=3, **QUICK)[0]
    assert got.choices[0].message.content != oracle(["Of where?"], seed=3, **QUICK)[0]  # the earlier turns count
    tok = Tokenizer(MODEL)  # BOS, the turns up to the reply, its EOS, the last user turn, the assistant header
    layout = ([tok.bos_id] + tok.encode("<|system|>\nBe brief.\n<|user|>\nWho is Hamlet?\n<|assistant|>\nA prince.")
              + [tok.eos_id] + tok.encode("\n<|user|>\nOf where?\n<|assistant|>\n"))
    assert got.usage.prompt_tokens == len(layout) == 1 + 36 + 1 + 20


def test_the_sampler_and_shedding_reach_the_reverse_process(server, client, oracle):
    """The shipped model's answers here end in [PAD] by the second step: rows of 96 positions shed their tail
    (to 27 positions, for this seed), as sample.generate's do; the diffusion stream shows the rows that shed."""
    sea, extra = [{"role": "user", "content": "Speak of the sea."}], {"steps": 12, "total_length": 96}
    want = oracle(["Speak of the sea."], steps=12, max_tokens=None, total_length=96, seed=6, sampler="ddim", shed=2)
    assert want != oracle(["Speak of the sea."], steps=12, max_tokens=None, total_length=96, seed=6)
    got = client.chat.completions.create(model=name(server), messages=sea, seed=6,
                                         extra_body={**extra, "sampler": "ddim", "shed": 2})
    assert [got.choices[0].message.content] == want
    c, r = server.open_stream("/v1/chat/completions", {"messages": sea, "seed": 6, **extra, "sampler": "ddim",
                                                       "shed": 2, "stream_options": {"diffusion": True}})
    steps = list(events(r))
    c.close()
    assert steps[-2]["step"] == 12 and steps[-2]["choices"][0]["text"] == want[0]
    assert steps[-1]["choices"][0]["message"]["content"] == want[0]


def test_stop_strings_cut_the_answer_and_finish_reason_says_why(server, client, oracle):
    messages = [{"role": "user", "content": BRUTUS}]
    want = oracle([BRUTUS], seed=1, **QUICK)[0]
    assert len(want) > 20 and " my" in want  # this seed's answer fills its 24 positions
    got = client.chat.completions.create(model=name(server), messages=messages, seed=1, max_tokens=24,
                                         extra_body={"steps": 12})
    assert got.choices[0].message.content == want and got.choices[0].finish_reason == "length"
    got = client.chat.completions.create(model=name(server), messages=messages, seed=1, max_tokens=24,
                                         stop=["no such words", " my"], extra_body={"steps": 12})
    assert got.choices[0].message.content == want[:want.index(" my")] and got.choices[0].finish_reason == "stop"


def test_streamed_chat_and_completion_arrive_through_the_stock_client(server, client, oracle):
    prompt = "Speak of the sea."
    stream = client.chat.completions.create(model=name(server), messages=[{"role": "user", "content": prompt}],
                                            seed=4, max_tokens=24, stream=True, stream_options={"include_usage": True},
                                            extra_body={"steps": 12})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == oracle([prompt], seed=4, **QUICK)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].choices == []
    stream = client.completions.create(model=name(server), prompt="ROMEO.", seed=4, max_tokens=24, stream=True,
                                       extra_body={"steps": 12})
    assert "".join(c.choices[0].text for c in stream) == oracle(["ROMEO."], seed=4, chat=False, **QUICK)[0]


def test_the_diffusion_stream_carries_the_whole_text_at_every_step(server, oracle):
    body = {"messages": [{"role": "user", "content": "Speak of the sea."}], "seed": 4, **QUICK,
            "stream_options": {"diffusion": True}}
    c, r = server.open_stream("/v1/chat/completions", body)
    got = list(events(r))
    c.close()
    steps, final = got[:-1], got[-1]
    assert [e["step"] for e in steps] == list(range(1, 13)) and {e["object"] for e in steps} == {"diffusion.step"}
    for e in steps:
        row = e["choices"][0]
        assert len(row["tokens"]) == len(row["confidence"]) and all(0 <= p <= 1 for p in row["confidence"])
    want = oracle(["Speak of the sea."], seed=4, **QUICK)[0]
    assert steps[-1]["choices"][0]["text"] == want == final["choices"][0]["message"]["content"]
    assert "".join(steps[-1]["choices"][0]["tokens"]).strip() == want.strip()
    assert len({e["choices"][0]["text"] for e in steps}) > 1  # the text changes as it denoises
    c, r = server.open_stream("/v1/completions", {"prompt": "ROMEO.", **QUICK, "stream_options": {"diffusion": True,
                                                                                                  "every": 5}})
    assert [e.get("step") for e in events(r)] == [5, 10, 12, None]  # every 5 steps, the last, then the answer
    c.close()


def test_eight_concurrent_clients_each_get_their_sequential_answer(server, client, oracle):
    prompts = [f"Speak of the {w}." for w in "sea sun moon king queen war love night".split()]
    got = [None] * len(prompts)

    def ask(j):
        r = client.chat.completions.create(model=name(server), messages=[{"role": "user", "content": prompts[j]}],
                                           seed=10 + j, max_tokens=24, extra_body={"steps": 12})
        got[j] = r.choices[0].message.content
    threads = [threading.Thread(target=ask, args=(j,)) for j in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [oracle([p], seed=10 + j, **QUICK)[0] for j, p in enumerate(prompts)]


def together(server, requests):
    """Streamed requests [(path, body)] in one batch: the first runs, then the others join it at once.
    -> per request: (the text of each choice, when its rows joined the batch (its first event), when
    its answer ended), times from time.monotonic()."""
    out, running = [None] * len(requests), threading.Event()

    def ask(j):
        path, body = requests[j]
        c, r = server.open_stream(path, body)
        texts, joined = collections.defaultdict(str), None
        for e in events(r):  # OpenAI's chunks: the first says the rows joined (role, or empty text)
            joined = joined or time.monotonic()
            running.set()
            for choice in e["choices"]:
                texts[choice["index"]] += choice["text"] if "text" in choice else choice["delta"].get("content", "")
        c.close()
        out[j] = ([texts[i] for i in sorted(texts)], joined, time.monotonic())
    first = threading.Thread(target=ask, args=(0,))
    first.start()
    running.wait(60)
    rest = [threading.Thread(target=ask, args=(j,)) for j in range(1, len(requests))]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join()
    return out


def test_requests_with_their_own_settings_and_lengths_share_the_batch_and_get_their_sequential_answers(server,
                                                                                                        oracle):
    sea, gap = [{"role": "user", "content": "Speak of the sea."}], "To be, or <mask:3> be"
    requests = [("/v1/completions", {"prompt": "ROMEO.", "steps": 40, "max_tokens": 40, "seed": 1}),  # runs first
                ("/v1/chat/completions", {"messages": sea, "n": 2, "seed": 4, **QUICK}),
                ("/v1/completions", {"prompt": gap, "steps": 20, "max_tokens": 8, "argmax": True, "seed": 2}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": BRUTUS}], "steps": 30,
                                          "total_length": 96, "top_p": 0.5, "early_exit": 3, "seed": 7})]
    got = together(server, requests)
    assert [texts for texts, _, _ in got] == [
        oracle(["ROMEO."], steps=40, max_tokens=40, seed=1, chat=False),
        oracle(["Speak of the sea."] * 2, seed=4, **QUICK),
        oracle([gap], steps=20, max_tokens=8, seed=2, chat=False, top_p=None),
        oracle([BRUTUS], steps=30, max_tokens=None, total_length=96, top_p=0.5, early_exit=3, seed=7)]
    assert max(joined for _, joined, _ in got[1:]) < got[0][2], "the requests did not run together"
    assert got[1][2] < got[0][2]  # the short one left the batch before the long one ended


def test_a_request_arriving_mid_run_streams_before_the_running_one_ends(server):
    long = {"prompt": "ROMEO.", "steps": 150, "max_tokens": 16, "stream_options": {"diffusion": True, "every": 10}}
    c1, r1 = server.open_stream("/v1/completions", long)
    first = events(r1)
    next(first)  # the long request runs
    arrivals = []  # (time, step) of each of its later events, read as they come
    reader = threading.Thread(target=lambda: arrivals.extend((time.monotonic(), e.get("step")) for e in first))
    reader.start()
    c2, r2 = server.open_stream("/v1/completions", {"prompt": "ROMEO.", **QUICK,
                                                    "stream_options": {"diffusion": True}})
    next(events(r2))
    joined = time.monotonic()
    reader.join()
    c1.close(), c2.close()
    ended = arrivals[-1][0]  # the long request's answer
    assert arrivals[-1][1] is None and joined < ended, "the new request streamed only after the running one ended"


# -----------------------------------------------------------------------------
# Bad requests: OpenAI's error format, and the server goes on


CHAT = {"messages": [{"role": "user", "content": "hi"}], **QUICK}
BAD = [  # (body, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "steps": NaN}', 400, None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, None),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),  # a lone surrogate: not text
    ({**CHAT, "messages": [{"role": "user", "content": "a <mask:999999999999> b"}]}, 400, "messages"),
    ({**CHAT, "steps": 0}, 400, "steps"),
    ({**CHAT, "steps": -3}, 400, "steps"),
    ({**CHAT, "steps": "12"}, 400, "steps"),
    ({**CHAT, "steps": 12.5}, 400, "steps"),
    ({**CHAT, "max_tokens": True}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": 5000}, 400, "max_tokens"),  # the model reads 1024 positions
    ({**CHAT, "max_tokens": 1020}, 400, "max_tokens"),  # prompt + 1020 > 1024
    ({**CHAT, "model": "gpt-4"}, 400, "model"),
    ({**CHAT, "model": "../models/tess2-shakespeare-rm"}, 400, "model"),  # a name, never a path to open
    ({**CHAT, "eta": 0.5}, 400, "eta"),  # no reward model loaded
    ({**CHAT, "top_p": 0}, 400, "top_p"),
    ({**CHAT, "top_p": 0.9, "argmax": True}, 400, "argmax"),
    ({**CHAT, "n": 9}, 400, "n"),  # more rows than --max-batch 8
    ({**CHAT, "seed": -1}, 400, "seed"),
    ({**CHAT, "stream": "yes"}, 400, "stream"),
    ({**CHAT, "stream_options": {"diffusion": True}}, 400, "stream_options"),  # without stream
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({**CHAT, "temperature": 0.7}, 400, "temperature"),
    ({**CHAT, "messages": "hi"}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}, 400,
     "messages"),  # the model answers the user: the last message is theirs
    ({**CHAT, "messages": [{"role": "user", "content": "To be <mask:3> be"}]}, 400, "messages"),  # no gaps in a chat
    ({**CHAT, "sampler": "euler"}, 400, "sampler"),
    ({**CHAT, "sampler": 1}, 400, "sampler"),
    ({**CHAT, "shed": 0}, 400, "shed"),
    ({**CHAT, "shed": "2"}, 400, "shed"),
    ({k: v for k, v in CHAT.items() if k != "messages"}, 400, "messages"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=range(len(BAD)))
def test_a_bad_request_gets_400_in_openai_format_and_the_server_goes_on(server, body, status, param):
    got, error = server.post("/v1/chat/completions", body)
    assert got == status and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == param and error["error"]["message"]
    assert server.health()["status"] == "ok"


def test_the_stock_client_sees_the_errors_as_its_own_exceptions(server, client):
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list()] == ["tess2-shakespeare"]


def test_a_bad_gap_in_a_completion_is_named_by_its_cause(server):
    for prompt, words in (("To be <mask:\u00b3> be", "'\u00b3' is not a number written in the digits 0-9"),
                          ("To be <mask:0> be", "a gap of 0 tokens leaves nothing to fill"),
                          ("To be <mask:5000> be", "a gap of 5000 tokens is longer than the 1024 positions")):
        status, error = server.post("/v1/completions", {"prompt": prompt, **QUICK})
        assert status == 400 and error["error"]["param"] == "prompt" and words in error["error"]["message"], error


def test_keys_sizes_and_paths(server):
    assert server.post("/v1/chat/completions", CHAT, key=None)[0] == 401
    assert server.post("/v1/chat/completions", CHAT, key="wrong")[0] == 401
    status, error = server.post("/v1/completions", {"prompt": "x" * (serving.MAX_BODY + 1)})
    assert status == 413 and "bytes" in error["error"]["message"]
    assert server.get("/v1/nothing")[0] == 404 and server.get("/v1/completions")[0] == 405
    assert server.get("/health")[0] == 200 and b"<textarea" in server.get("/")[1]


def test_a_client_that_disconnects_frees_its_row_at_once(server):
    before = server.idle()["cancelled"]
    c, r = server.open_stream("/v1/completions", {"prompt": "ROMEO.", "steps": 5000, "max_tokens": 16,
                                                   "stream_options": {"diffusion": True}})
    next(events(r))
    assert server.health()["active_rows"] == 1
    c.sock.shutdown(socket.SHUT_RDWR), c.close()
    deadline = time.time() + 10
    while server.health()["active_rows"] and time.time() < deadline:
        time.sleep(0.05)
    health = server.health()
    assert health["active_rows"] == 0 and health["cancelled"] == before + 1
    # a client that gives up on a plain (unstreamed) request frees its row too
    with pytest.raises(TimeoutError):
        server.post("/v1/completions", {"prompt": "ROMEO.", "steps": 5000, "max_tokens": 16}, timeout=1)
    deadline = time.time() + 10
    while server.health()["cancelled"] < before + 2 and time.time() < deadline:
        time.sleep(0.05)
    assert server.health()["cancelled"] == before + 2 and server.health()["active_rows"] == 0


@pytest.mark.slow
def test_a_full_queue_answers_429_and_the_queue_empties_as_clients_leave(tmp_path):
    small = Server(tmp_path, "--max-batch", "1", "--max-queue", "1")
    try:
        long = {"prompt": "ROMEO.", "steps": 5000, "max_tokens": 16, "stream_options": {"diffusion": True}}
        c1, r1 = small.open_stream("/v1/completions", long)
        next(events(r1))  # running
        c2, r2 = small.open_stream("/v1/completions", long)  # waiting
        deadline = time.time() + 10
        while small.health()["queued"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        status, error = small.post("/v1/completions", {"prompt": "ROMEO.", **QUICK})
        assert status == 429 and "--max-queue" in error["error"]["message"]
        assert small.post("/v1/completions", {"prompt": "a", "n": 2})[0] == 400  # 2 rows, batch of 1
        for c in (c2, c1):
            c.sock.shutdown(socket.SHUT_RDWR), c.close()
        deadline = time.time() + 10
        while (small.health()["active_rows"] or small.health()["queued"]) and time.time() < deadline:
            time.sleep(0.05)
        assert small.health()["cancelled"] == 2
        assert small.post("/v1/completions", {"prompt": "ROMEO.", **QUICK})[0] == 200
    finally:
        small.close()


@pytest.mark.slow
def test_guided_answers_equal_sample_py_with_the_reward_model_whatever_runs_beside_them(tmp_path, oracle):
    rm_path = os.path.join(ROOT, sample.DEFAULT_REWARD_MODEL)
    rm = Transformer.from_pretrained(rm_path, verbose=False).eval()
    s = Server(tmp_path, "--reward-model", rm_path)
    try:
        assert s.health()["reward_model"] is True  # the page then shows its eta control
        brutus, sea = [{"role": "user", "content": BRUTUS}], [{"role": "user", "content": "Speak of the sea."}]
        # guided with eta 0.5 (two requests of other lengths and steps), 0.25 (the default), 0.5 with G = 2,
        # and unguided (eta 0), all in one batch
        settings = [dict(eta=0.5, steps=40, max_tokens=24), dict(eta=0.5, steps=12, max_tokens=16), dict(**QUICK),
                    dict(eta=0.5, guidance_steps=2, **QUICK), dict(eta=0.0, **QUICK)]
        prompts = [(BRUTUS, brutus), ("Speak of the sea.", sea), (BRUTUS, brutus), (BRUTUS, brutus), (BRUTUS, brutus)]
        got = together(s, [("/v1/chat/completions", {"messages": messages, "seed": 2, **o})
                           for (_, messages), o in zip(prompts, settings)])
        assert max(joined for _, joined, _ in got[1:]) < got[0][2], "the requests did not run together"
        unguided = oracle([BRUTUS], seed=2, **QUICK)
        for (prompt, _), o, (texts, _, _) in zip(prompts, settings, got):
            assert texts == oracle([prompt], seed=2, reward_model=rm, **o), o
        assert got[2][0] != unguided and got[3][0] != unguided and got[4][0] == unguided
    finally:
        s.close()


@pytest.mark.slow
def test_sigterm_drains_the_running_request_cancels_the_rest_and_exits_0(tmp_path):
    s = Server(tmp_path, "--drain", "5")
    try:
        diffusion = {"stream_options": {"diffusion": True, "every": 10}}
        c1, r1 = s.open_stream("/v1/completions", {"prompt": "ROMEO.", "steps": 40, "max_tokens": 16, **diffusion})
        running = events(r1)
        next(running)
        c2, r2 = s.open_stream("/v1/completions", {"prompt": "ROMEO.", "steps": 10_000, "max_tokens": 16,
                                                   **diffusion})  # joins the batch, would run for minutes
        deadline = time.time() + 10
        while s.health()["active_rows"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        assert list(running)[-1]["object"] == "text_completion"  # drained: its answer arrived
        rest = list(events(r2))  # cancelled once the 5 s of draining are over
        assert "shutting down" in rest[-1]["error"]["message"]
        assert s.proc.wait(timeout=30) == 0, s.output()
        assert "Traceback" not in s.output()
    finally:
        s.close()


def test_bad_flags_end_in_one_line_and_status_2(capsys):
    for argv, words in ((["--max-batch", "0"], "--max-batch must be a positive integer, got 0"),
                        (["--max-queue", "-1"], "--max-queue must be 0 or a positive integer, got -1"),
                        (["--threads", "1e20"], "--threads must be a positive integer below 2**63, got 1e20"),
                        (["--drain", "nan"], "--drain must be a finite number >= 0, got nan"),
                        (["--api-key", " "], "--api-key is empty"),
                        (["--model", "/nonexistent/checkpoint"], "no checkpoint directory")):
        with pytest.raises(SystemExit) as e:
            serve.run_cli(serve.main, "serve.py", argv + ["--port", str(free_port())])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"serve.py: error: {words}") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        serve.run_cli(serve.main, "serve.py", ["--port", "70000"])
    assert e.value.code == 2 and "--port must be a whole number in [0, 65535], got 70000" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit):
            serve.run_cli(serve.main, "serve.py", ["--port", str(taken.getsockname()[1])])
    assert "serve.py: error:" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Pieces


def test_chat_messages_become_the_chat_prompt_that_generate_takes():
    many = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hail"}, {"type": "text", "text": "."}]},
            {"role": "user", "content": "  Who?\n"}]
    assert serving.chat_prompt(many) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hail."},
                                         {"role": "user", "content": "  Who?\n"}]  # stripped when encoded
    for bad, words in (([{"role": "assistant", "content": "hi"}], "a chat starts with a user message"),
                       ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                        "the last message is the assistant's"),
                       ([{"role": "user", "content": "a <mask:2>"}], "cannot hold <mask:N> gaps"),
                       ([{"role": "tool", "content": "a"}], "role is system, user or assistant")):
        with pytest.raises(serving.ApiError, match=re.escape(words)) as e:
            serving.chat_prompt(bad)
        assert e.value.status == 400 and e.value.param == "messages"


def test_answer_positions_are_where_decode_row_takes_its_tokens():
    eos, pad = 2, 9
    #        BOS  ctx gap gap ctx | region: a  PAD  b  EOS  c
    row = [1, 5, 7, 8, 6, 10, pad, 11, eos, 12]
    span = [False, False, True, True, False, True, True, True, True, True]
    assert serve.answer_positions(row, span, 5, eos, pad) == [2, 3, 5, 7]
    assert serving.cut_at_stop("To be, or not to be", ["not", "be"]) == ("To ", True)
    assert serving.cut_at_stop("To be", ["x"]) == ("To be", False)


# -----------------------------------------------------------------------------
# The page, in a real headless Chromium


@pytest.mark.slow
def test_the_page_shows_the_text_forming_in_headless_chromium(tmp_path):
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; CI installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in requirements-serve.txt")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    s = Server(tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    try:
        driver.get(f"http://127.0.0.1:{s.port}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "tess2-shakespeare")
        for field, value in (("steps", "40"), ("length", "32")):
            box = driver.find_element(By.ID, field)
            box.clear(), box.send_keys(value)
        driver.find_element(By.ID, "go").click()
        answer = driver.find_element(By.ID, "answer")
        WebDriverWait(driver, 120).until(lambda d: answer.get_attribute("data-done") == "1")
        assert int(answer.get_attribute("data-step")) == 40
        assert int(answer.get_attribute("data-distinct")) > 1  # the text changed over the steps
        final = answer.get_attribute("data-text")
        assert final and "steps/s" in driver.find_element(By.ID, "status").text
        assert answer.find_elements(By.TAG_NAME, "span")  # tokens, shaded by confidence
        driver.save_screenshot(str(tmp_path / "page.png"))
        scrub = driver.find_element(By.ID, "scrub")  # replay: back to the first step
        driver.execute_script("arguments[0].value = 1; arguments[0].dispatchEvent(new Event('input'))", scrub)
        assert answer.get_attribute("data-step") == "1" and answer.get_attribute("data-text") != final
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        driver.quit()
        s.close()
