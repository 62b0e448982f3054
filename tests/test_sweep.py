"""eval/sweep.py as a careful tool: every flag checked when parsed, and OUTPUT/sweep.json keyed by what
produced its points, so that another model, other prompts, another length or no scorer compute every
point again and the same flags compute nothing. sample.generate is replaced by a stand-in that
records its calls (the sampler itself is tested in test_sample.py)."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")  # eval.sweep shares eval.harness's defaults (requirements-eval.txt)

import eval.sweep as sweep  # noqa: E402
import sample  # noqa: E402
from model import Transformer, preset  # noqa: E402
from support.cli import run_cli  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402
from conftest import folder_hash  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "models", "tess2-shakespeare")


@pytest.fixture
def calls(monkeypatch):
    """The prompts and settings of every sample.generate call; each text is the prompt and its length."""
    made = []

    def generate(model, tok, prompts, steps, eta, details, length, **kw):
        made.append(dict(prompts=prompts, steps=steps, eta=eta, length=length, model=model.args.hidden_size,
                         sampler=kw.get("sampler"), shed=kw.get("shed")))
        return [SimpleNamespace(text=f"{p} then {length}", tokens=tok.encode(f" then {length}")) for p in prompts]
    monkeypatch.setattr(sample, "generate", generate)
    return made


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two prompt files, another diffusion model and a causal scorer, both with the shipped tokenizer."""
    root = tmp_path_factory.mktemp("sweep")
    tok = Tokenizer(SHIPPED)
    (root / "p1.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("To be, or not", "Friends,")))
    (root / "p2.jsonl").write_text("Now is the winter\nO Romeo\n")
    (root / "empty.jsonl").write_text("\n")
    torch.manual_seed(0)
    for name, kind in (("other", dict(timestep_embed=True, causal=False)), ("scorer", dict(sliding_window=None))):
        net = Transformer(preset("tiny", vocab_size=tok.vocab_size, **kind)).init_weights().eval()
        net.save_pretrained(str(root / name), tokenizer_from=SHIPPED)
    return {name.removesuffix(".jsonl"): str(root / name)
            for name in ("p1.jsonl", "p2.jsonl", "empty.jsonl", "other", "scorer")} | {"root": root}


def base(files, out, *more):
    return ["--prompts", files["p1"], "--steps", "1,2", "--length", "4", "--scorer", files["scorer"],
            "--output", str(out), *more]


def without(argv, flag):
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def table(out, key="steps"):
    return (out / f"sweep_{key}.md").read_text()


CHANGES = {  # another run into the same OUTPUT: (how the flags change, what its table or calls show)
    "another model": lambda argv, f: argv + ["--model", f["other"]],
    "other prompts": lambda argv, f: [f["p2"] if a == f["p1"] else a for a in argv],
    "another length": lambda argv, f: [("5" if a == "4" else a) for a in argv],
    "no scorer": lambda argv, f: without(argv, "--scorer"),
    "another seed": lambda argv, f: argv + ["--seed", "1"],
    "argmax": lambda argv, f: argv + ["--argmax"],
    "no chat template": lambda argv, f: argv + ["--no-chat"],  # the shipped model's own is the template
    "the deterministic sampler": lambda argv, f: argv + ["--sampler", "ddim"],
    "shedding": lambda argv, f: argv + ["--shed", "2"],
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_another_sweep_into_the_same_output_computes_every_point_again(change, files, calls, tmp_path):
    out = tmp_path / "out"
    sweep.main(base(files, out))
    assert len(calls) == 2 and "perplexity" in table(out)
    sweep.main(base(files, out))  # the same sweep: every point is done
    assert len(calls) == 2
    sweep.main(CHANGES[change](base(files, out), files))
    assert len(calls) == 4, "the earlier points were reported for another sweep"
    second = calls[2]
    if change == "another model":
        assert second["model"] != calls[0]["model"]
    if change == "other prompts":
        gens = [json.loads(line) for line in (out / "generations_steps_1.jsonl").read_text().splitlines()]
        assert [g["prompt"] for g in gens] == ["Now is the winter", "O Romeo"]
    if change == "another length":
        assert second["length"] == 5 and "then 5" in (out / "generations_steps_2.jsonl").read_text()
    if change == "no scorer":
        assert "perplexity" not in table(out)
    if change in ("the deterministic sampler", "shedding"):  # what sample.generate was given
        ddim = change == "the deterministic sampler"
        assert (second["sampler"], second["shed"]) == (("ddim", None) if ddim else (None, 2))
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["steps"] for p in points] == [1, 2]


def test_a_stopped_sweep_resumes_at_its_next_point(files, calls, tmp_path):
    out = tmp_path / "out"
    sweep.main(base(files, out))
    state = json.loads((out / "sweep.json").read_text())
    state["points"] = state["points"][:1]  # stopped after its first point
    (out / "sweep.json").write_text(json.dumps(state))
    sweep.main(base(files, out))
    assert [c["steps"] for c in calls] == [1, 2, 2]


def test_another_sweep_removes_the_earlier_sweeps_files(files, calls, tmp_path, capsys):
    out = tmp_path / "out"
    sweep.main(without(base(files, out), "--steps") + ["--steps", "1,2,3"])
    sweep.main(without(base(files, out), "--steps") + ["--steps", "5,6", "--length", "5"])
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "generations_steps_5.jsonl", "generations_steps_6.jsonl", "sweep.json", "sweep_steps.md", "sweep_steps.png"]
    sweep.main(base(files, out, "--eta", "0,1", "--steps", "2"))  # steps, then eta, into one OUTPUT
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "generations_eta_0.jsonl", "generations_eta_1.jsonl", "sweep.json", "sweep_eta.md", "sweep_eta.png"]
    assert [p["eta"] for p in json.loads((out / "sweep.json").read_text())["points"]] == [0.0, 1.0]


# -----------------------------------------------------------------------------
# refused sweeps change nothing


REFUSALS = [  # (flags, phrase of the message); {name} is a path of the `files` fixture
    (["--steps", "0,1"], "--steps must be a positive integer, or several separated by commas, got 0,1"),
    (["--steps", "1e20,2"], "--steps must be a positive integer, or several separated by commas, got 1e20,2"),
    (["--steps", "1,x"], "--steps must be a positive integer, or several separated by commas, got 1,x"),
    (["--eta", "nan,1"], "--eta must be a finite number >= 0, or several separated by commas, got nan,1"),
    (["--eta", "0,-1"], "--eta must be a finite number >= 0, or several separated by commas, got 0,-1"),
    (["--top-p", "0"], "--top-p must be a number in (0, 1], got 0"),
    (["--top-p", "1.5"], "--top-p must be a number in (0, 1], got 1.5"),
    (["--length", "0"], "--length must be a positive integer, got 0"),
    (["--limit", "0"], "--limit must be a positive integer, got 0"),
    (["--limit", "-1"], "--limit must be a positive integer, got -1"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--seed", str(2**70)], f"--seed must be a whole number in [0, 2**63), got {2**70}"),
    (["--seed", "-1"], "--seed must be a whole number in [0, 2**63), got -1"),
    (["--guidance-steps", "0"], "--guidance-steps must be a positive integer, got 0"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (["--shed", "0"], "--shed must be a positive integer, got 0"),
    (["--eta", "0,1"], "sweep one thing at a time: a list for --eta or for --steps, not both"),
    (["--steps", "100"], "nothing to sweep: give --steps 10,50,100 or --eta 0,0.25,0.5"),
    (["--prompts", "{root}/missing.jsonl"], "No such file or directory"),
    (["--prompts", "{empty}"], "empty.jsonl: no prompts"),
    (["--model", "{root}/no-model"], "no checkpoint directory"),
]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, files):
    """The OUTPUT of a finished sweep (sample.generate stood in for by a fixed text)."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    real = sample.generate
    sample.generate = lambda model, tok, prompts, **kw: [SimpleNamespace(text="x", tokens=[5]) for _ in prompts]
    try:
        sweep.main(base(files, out))
    finally:
        sample.generate = real
    return out


@pytest.mark.parametrize("flags, phrase", REFUSALS, ids=[" ".join(f) for f, _ in REFUSALS])
def test_a_refused_sweep_is_one_line_and_changes_no_output(flags, phrase, files, earlier, calls, tmp_path, capsys):
    flags = [f.format(**files) for f in flags]
    for out in (tmp_path / "new", shutil.copytree(earlier, tmp_path / "earlier")):
        before = folder_hash(out)
        argv = base(files, out)
        for flag in flags[::2]:
            argv = without(argv, flag) if flag in argv else argv
        with pytest.raises(SystemExit) as stop:
            run_cli(sweep.main, "eval.sweep", argv + flags)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith("eval.sweep: error: ") and phrase.format(**files) in err, err
        assert folder_hash(out) == before and not calls
