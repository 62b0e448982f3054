"""
Tiny training runs for the tests of train.py and support/run_folder.py: a word-level tokenizer,
datasets of a few hundred random tokens written with data.shards, train.py's flags for a tiny
run of each stage (model.preset("tiny"), CPU, fp32), run in this process or under torchrun, and
readers of what a run wrote.
"""
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.torch import load_file
from torch.testing import assert_close

import train
from conftest import word_tokenizer
from data.shards import write_pairs, write_spans, write_tokens
from support.tokenizer import Tokenizer as ModelTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIGHT = dict(atol=1e-5, rtol=1e-5)
# weights after 4 AdamW steps: Adam divides by sqrt(v), so an element whose gradient is ~0 turns fp32
# summation-order noise (micro-batches, ranks) into an update of up to 1e-5 here; lr is 3e-3
WEIGHTS = dict(atol=1e-4, rtol=1e-5)


def make_tokenizer(folder, words=57):
    """A word-level tokenizer: <unk> <s> </s> w0..w56; tokenizer.Tokenizer adds [PAD] (id 60, V = 61)."""
    return word_tokenizer(folder, ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(words))])


def make_data(root, kind, n=24, seed=0, tok_dir=None):
    tok_dir = tok_dir or make_tokenizer(os.path.join(root, "tok"))
    info = ModelTokenizer(tok_dir)
    meta = dict(info.meta(), source="test")
    rng = np.random.default_rng(seed)
    words = lambda k: list(rng.integers(3, 60, k))  # noqa: E731
    path = os.path.join(root, f"{kind}-{seed}")
    if kind == "tokens":
        write_tokens(path, [words(rng.integers(5, 40)) + [info.eos_id] for _ in range(n * 4)], meta)
    elif kind == "spans":
        examples = []
        for _ in range(n):
            prompt = [info.bos_id] + words(rng.integers(2, 10))
            examples.append((prompt + words(rng.integers(2, 12)) + [info.eos_id], len(prompt)))
        write_spans(path, examples, meta)
    else:
        pairs = []
        for _ in range(n):
            prompt = [info.bos_id] + words(rng.integers(2, 8))
            pairs.append((prompt + words(rng.integers(2, 8)) + [info.eos_id],
                          prompt + words(rng.integers(2, 8)) + [info.eos_id], len(prompt)))
        write_pairs(path, pairs, meta)
    return path


def make_datasets(root):
    """{kind: folder} for tokens, spans and pairs, a held-out tokens folder "val", and the tokenizer "tok"."""
    tok = make_tokenizer(os.path.join(root, "tok"))
    out = {kind: make_data(root, kind, tok_dir=tok) for kind in ("tokens", "spans", "pairs")}
    out["val"] = make_data(root, "tokens", seed=1, tok_dir=tok)
    out["tok"] = tok
    return out


STAGE_DATA = dict(adapt="tokens", sft="spans", rm="pairs", ar="tokens")


def flags(stage, datasets, out, **kw):
    """Command-line flags of a tiny run; keyword arguments add or replace flags (a list: a flag of several
    values, True: a switch, None or False: left out)."""
    base = dict(stage=stage, init="scratch", preset="tiny", data=datasets[STAGE_DATA[stage]], out=str(out),
                seq_len=24, batch_size=4, micro_batch_size=1, max_steps=4, lr=3e-3, schedule="linear",
                warmup_steps=1, device="cpu", save_every=1000)
    argv = []
    for k, v in {**base, **kw}.items():
        if v is True:
            argv.append("--" + k.replace("_", "-"))
        elif isinstance(v, (list, tuple)):
            argv += ["--" + k.replace("_", "-"), *map(str, v)]
        elif v is not None and v is not False:
            argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def run(stage, datasets, out, **kw):
    train.main(flags(stage, datasets, out, **kw))
    return read_log(out)


def torchrun(stage, datasets, out, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", os.path.join(ROOT, "train.py"), *flags(stage, datasets, out, **kw)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        output = p.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # torchrun and its workers
        raise
    assert p.returncode == 0, output[-5000:]
    return read_log(out)


def read_text(path):
    return path.read_text() if path.exists() else ""


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return dict(train=[r for r in records if "loss" in r], val=[r for r in records if "val_loss" in r])


def losses(log):
    return [r["loss"] for r in log["train"]]


def weights(out, step):
    return load_file(os.path.join(out, f"step-{step:07d}", "model.safetensors"))


def assert_same_weights(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], **(tol or TIGHT), msg=k)


def no_checkpoint(out):
    return not os.path.exists(out) or not [d for d in os.listdir(out) if "step-" in d]


def tree(path):
    """{relative path: bytes (None for a folder)} of everything at path, hidden files included; None if
    nothing is there. Two equal trees are byte for byte the same."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return {".": open(path, "rb").read()}
    found = {}
    for folder, dirs, files in os.walk(path):
        for d in dirs:
            found[os.path.relpath(os.path.join(folder, d), path)] = None
        for f in files:
            found[os.path.relpath(os.path.join(folder, f), path)] = open(os.path.join(folder, f), "rb").read()
    return found
