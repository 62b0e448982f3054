"""The miniature (issue 6): the whole recipe runs end to end, and the shipped models are the ones recorded."""
import hashlib
import os
import subprocess
import sys

import pytest

from model import Transformer
from tokenizer import Tokenizer
from sample import DEFAULT_MODEL, DEFAULT_REWARD_MODEL, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_whole_sequence_runs_at_smoke_size(tmp_path):
    """ar -> adapt (and from scratch) -> sft -> rm -> measurements, a few steps each; the result samples."""
    out = tmp_path / "mini"
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable, OMP_NUM_THREADS="1", SHIP=str(tmp_path / "models"))
    run = subprocess.run(["bash", "eval/miniature.sh", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = (out / "results.md").read_text()
    assert "adapted from AR" in results and "| eta |" in results
    for name in ("tess2-shakespeare", "tess2-shakespeare-rm"):  # shipped layout, bf16
        assert (tmp_path / "models" / name / "model.safetensors").exists()
    model = Transformer.from_pretrained(str(tmp_path / "models" / "tess2-shakespeare"))
    texts = generate(model, Tokenizer(str(tmp_path / "models" / "tess2-shakespeare")), ["Who says this?"],
                     steps=3, length=8)
    assert isinstance(texts[0], str)


SHIPPED = [os.path.join(ROOT, DEFAULT_MODEL), os.path.join(ROOT, DEFAULT_REWARD_MODEL)]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_match_their_recorded_checksums(name):
    with open(os.path.join(ROOT, "models", "SHA256SUMS")) as f:
        recorded = dict(line.split()[::-1] for line in f if line.strip())
    files = sorted(os.listdir(name))
    assert files, name
    for file in files:
        rel = os.path.relpath(os.path.join(name, file), os.path.join(ROOT, "models"))
        assert recorded.get(rel) == sha256(os.path.join(name, file)), f"{rel} changed: update models/SHA256SUMS if meant"


def test_shipped_models_are_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d in SHIPPED for f in os.listdir(d))
    assert total < 15 * 2**20


def test_shipped_model_samples_with_and_without_reward_guidance():
    tok = Tokenizer(SHIPPED[0])
    model = Transformer.from_pretrained(SHIPPED[0]).eval()
    rm = Transformer.from_pretrained(SHIPPED[1]).eval()
    assert model.args.timestep_embed and not model.args.causal and rm.args.head == "score"
    prompt = "Continue this speech by Brutus from Julius Caesar:\nRomans, countrymen, and lovers!"
    plain = generate(model, tok, [prompt], steps=10, length=24, seed=0)
    guided = generate(model, tok, [prompt], steps=10, length=24, seed=0, reward_model=rm, eta=0.5)
    assert plain[0].strip() and guided[0].strip()
    assert plain == generate(model, tok, [prompt], steps=10, length=24, seed=0)  # seeded


def test_sample_cli_defaults_to_the_shipped_model():
    run = subprocess.run([sys.executable, "sample.py", "--prompt", "Who says this in Hamlet?\nTo be, or not to be",
                          "--steps", "5", "--length", "8", "--json"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"text"' in run.stdout
