"""
Serving: requests/s and time to first event of serve.py with 1, 4 and 16 concurrent clients,
continuous batching against one request at a time. Not a test: a measurement.

    python bench/bench_serve.py                                   # the shipped miniature, 20 steps, 32 tokens
    python bench/bench_serve.py --clients 1 4 16 --requests 32 --steps 50 --max-tokens 64
    python bench/bench_serve.py --url http://127.0.0.1:8000       # a server already running (its own flags)

It starts `python serve.py` twice, each on a free loopback port (unless --url), one for each way:
  - continuous: --max-batch 16; requests join the running batch between diffusion steps and leave it
    when done, each at its own step;
  - one at a time: --max-batch 1; a request waits in the server's queue until the one before it is
    done, as a server without batching serves them.
For each number of clients c, a round on each server in turn (an idle server takes no CPU, and both
ways meet the same load from the rest of the machine): c threads send --requests chat requests in
all, each as soon as its previous one ended (request j: its own prompt and seed j, the
diffusion-native stream with an event every step), and time each from the moment it is sent:
  - first event: until the first step of its answer arrives (the page's first drawing);
  - answer: until its final answer arrives.
Requests/s is requests over the wall time of the whole round. Warm-up: one request first.
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = "sea sun moon king queen war love night crown sword ghost storm rose grave fool wine".split()


def start_server(flags):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--port", str(port), *flags], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if health(url)["status"] == "ok":
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("bench_serve.py: serve.py did not start")


def health(url):
    u = urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def one_request(url, j, a, key=None):
    """A streamed chat request -> (seconds to its first event, seconds to its answer)."""
    u, t0 = urlparse(url), time.perf_counter()
    body = {"messages": [{"role": "user", "content": f"Speak of the {TOPICS[j % len(TOPICS)]}."}], "seed": j,
            "steps": a.steps, "max_tokens": a.max_tokens, "stream": True,
            "stream_options": {"diffusion": True, "every": 1}}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("POST", "/v1/chat/completions", json.dumps(body), headers=headers)
    r, first = c.getresponse(), None
    if r.status != 200:
        raise SystemExit(f"bench_serve.py: the server answered {r.status}: {r.read()[:300]!r}")
    for line in r:
        if line.startswith(b"data: ") and first is None:
            first = time.perf_counter() - t0
        if line.startswith(b"data: [DONE]"):
            break
    c.close()
    return first, time.perf_counter() - t0


def round_of(url, a, clients):
    """c client threads share a.requests requests -> (wall seconds, [(first, answer)] per request)."""
    jobs, results, lock = list(range(a.requests)), [], threading.Lock()

    def client():
        while True:
            with lock:
                if not jobs:
                    return
                j = jobs.pop(0)
            timing = one_request(url, j, a, a.api_key)
            with lock:
                results.append(timing)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def summary(wall, results):
    firsts, answers = sorted(f for f, _ in results), sorted(x for _, x in results)
    p90 = lambda xs: xs[min(len(xs) - 1, int(0.9 * len(xs)))]  # noqa: E731
    return dict(requests_per_s=round(len(results) / wall, 2), first_event_median_s=round(statistics.median(firsts), 3),
                first_event_p90_s=round(p90(firsts), 3), answer_median_s=round(statistics.median(answers), 3))


def measure(servers, a):
    """servers: [(way, url)]. For each number of clients, a round on each server in turn -> a row each,
    printed as it is measured."""
    for _, url in servers:
        one_request(url, 0, a, a.api_key)  # warm-up
    for clients in a.clients:
        for way, url in servers:
            row = dict(clients=clients, way=way, **summary(*round_of(url, a, clients)))
            first = f"{row['first_event_median_s']:.3f} / {row['first_event_p90_s']:.3f}"
            print(json.dumps(row) if a.json else f"{clients:>7}  {way:<13} {row['requests_per_s']:>6.2f}   "
                  f"{first:>28}   {row['answer_median_s']:>17.3f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running serve.py, measured as it is (default: start one per way)")
    p.add_argument("--api-key", help="the running server's key")
    p.add_argument("--model", help="serve.py --model (default: its default)")
    p.add_argument("--threads", type=int, default=1, help="serve.py --threads (default 1)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per round")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object per row")
    a = p.parse_args()
    if not a.json:
        server = a.url or f"serve.py --threads {a.threads}" + (f" --model {a.model}" if a.model else "")
        print(f"{server}: {a.steps} steps, {a.max_tokens} tokens, {a.requests} requests per round\n"
              "clients  way            req/s   first event median / p90 (s)   answer median (s)")
    if a.url:
        return measure([("given server", a.url)], a)
    procs, servers = [], []
    try:
        for way, max_batch in (("continuous", 16), ("one at a time", 1)):
            flags = ["--max-batch", str(max_batch), "--max-queue", "64", "--threads", str(a.threads)]
            proc, url = start_server(flags + (["--model", a.model] if a.model else []))
            procs.append(proc)
            servers.append((way, url))
        measure(servers, a)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
