"""eval/intrinsic.py and eval/sweep.py: adaptation metrics (Tables 1-2) and the Figure 3 sweeps."""
import argparse
import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

mauve = pytest.importorskip("mauve")  # requirements-eval.txt

import eval.intrinsic as intrinsic  # noqa: E402
import eval.sweep as sweep  # noqa: E402
import sample  # noqa: E402
from model import Transformer, preset  # noqa: E402
from support.cli import run_cli  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402
from conftest import assert_refused, folder_hash  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "models", "tess2-shakespeare")
ROWS = [{"prompt": "Romans, countrymen, and lovers!", "reference": "hear me for my cause, and be silent"},
        {"prompt": "To be, or not to be:", "reference": "that is the question"},
        {"prompt": "Now is the winter", "reference": "of our discontent made glorious summer"},
        {"prompt": "Friends, Romans,", "reference": "countrymen, lend me your ears"}]


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    """A small random causal LM with the shipped tokenizer, saved as a checkpoint: the held-out scorer."""
    tok = Tokenizer(SHIPPED)
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=tok.vocab_size, sliding_window=None)).init_weights().eval()
    d = str(tmp_path_factory.mktemp("scorer") / "scorer")
    m.save_pretrained(d, tokenizer_from=SHIPPED)
    return d


def test_mauve_of_identical_inputs_is_one(scorer_dir):
    scorer, tok = Transformer.from_pretrained(scorer_dir, verbose=False).eval(), Tokenizer(scorer_dir)
    texts = [f"{r['reference']} {word}" for r in ROWS for word in "and or but yet so for nor lo ho ay".split()]
    f = intrinsic.features(scorer, tok, texts)  # 40 texts: MAUVE's automatic buckets need a few dozen
    assert f.shape == (40, scorer.args.hidden_size)
    assert intrinsic.mauve_score(f, f.clone()) == pytest.approx(1.0)


def test_features_are_the_last_tokens_final_hidden_state(scorer_dir):
    scorer, tok = Transformer.from_pretrained(scorer_dir, verbose=False).eval(), Tokenizer(scorer_dir)
    ids = torch.tensor([[tok.bos_id] + tok.encode("that is the question")])
    with torch.no_grad():
        want = scorer.hidden_states(ids, causal=True)[0, -1]
    torch.testing.assert_close(intrinsic.features(scorer, tok, ["that is the question"])[0], want)


def test_measure_against_hand_counts_and_the_scorers_own_tokens(scorer_dir):
    scorer, tok = Transformer.from_pretrained(scorer_dir, verbose=False).eval(), Tokenizer(scorer_dir)
    rows = [{"prompt": "a b", "reference": None}, {"prompt": "c", "reference": None}]
    texts = ["x y x", "y z"]
    m = intrinsic.measure(rows, texts, scorer, tok)
    assert m["distinct_1"] == pytest.approx(3 / 5) and m["distinct_2"] == pytest.approx(3 / 3)
    assert m["entropy"] == pytest.approx(-(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)))  # x 2, y 2, z 1
    assert "mauve" not in m  # no references
    nll, n = 0.0, 0
    for r, t in zip(rows, texts):  # restated: the continuation's tokens under the scorer, given BOS + prompt
        p, c = [tok.bos_id] + tok.encode(r["prompt"]), tok.encode(t)
        with torch.no_grad():
            logp = torch.log_softmax(scorer(torch.tensor([p + c]), causal=True)[0], -1)
        nll -= sum(logp[len(p) - 1 + j, x].item() for j, x in enumerate(c))
        n += len(c)
    assert m["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def write_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def test_intrinsic_command_line_end_to_end(tmp_path, scorer_dir):
    out = tmp_path / "out"
    intrinsic.main(["--prompts", write_prompts(tmp_path), "--scorer", scorer_dir, "--steps", "2",
                    "--length", "6", "--output", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    gens = [json.loads(line)["text"] for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 and m["n"] == 4
    from eval.metrics import distinct_n
    assert m["distinct_2"] == pytest.approx(distinct_n(gens, 2))
    assert 0.0 < m["mauve"] <= 1.0 and m["perplexity"] > 1.0


def test_steps_sweep_writes_a_table_and_a_plot_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--prompts", write_prompts(tmp_path), "--steps", "1,2", "--length", "4", "--limit", "2",
            "--output", str(out)]
    sweep.main(argv)
    table = (out / "sweep_steps.md").read_text().splitlines()
    assert table[0].startswith("| steps | distinct_1") and [r.split(" | ")[0] for r in table[2:]] == ["| 1", "| 2"]
    assert (out / "sweep_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("a finished point ran again"))
    sweep.main(argv)


def test_eta_sweep_measures_the_reward(tmp_path):
    out = tmp_path / "out"
    sweep.main(["--prompts", write_prompts(tmp_path), "--eta", "0,1", "--steps", "2", "--length", "4",
                "--limit", "2", "--chat", "--output", str(out)])
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["eta"] for p in points] == [0.0, 1.0] and all(isinstance(p["reward"], float) for p in points)


def test_sweep_refuses_two_sweeps_at_once(tmp_path, capsys):
    from support.cli import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(sweep.main, "eval.sweep",
                ["--prompts", "p", "--steps", "1,2", "--eta", "0,1", "--output", str(tmp_path)])
    assert e.value.code == 2 and "one thing at a time" in capsys.readouterr().err


def test_sampling_flags_left_out_are_the_checkpoints(tmp_path, monkeypatch):
    """No flag re-declares a sampling default: without flags the model samples with its
    generation_config.json's settings (the shipped model: rows of 160, its chat template)."""
    from support.prompts import given, settings_for
    p = argparse.ArgumentParser()
    intrinsic.common_flags(p)
    assert given(p.parse_args(["--prompts", "p", "--output", "o"])) == {}
    seen = []
    monkeypatch.setattr(intrinsic.sample, "generate", lambda m, t, prompts, **kw: seen.append((m, kw)) or
                        [SimpleNamespace(text="some words", tokens=[5])] * len(prompts))
    intrinsic.main(["--prompts", write_prompts(tmp_path), "--output", str(tmp_path / "out")])
    model, kw = seen[0]
    sampling = {k: v for k, v in kw.items() if k not in ("reward_model", "reward_tokenizer", "details")}
    cfg = model.generation_config
    assert settings_for(cfg, model.args.max_length, **sampling) == settings_for(cfg, model.args.max_length)
    assert settings_for(cfg, model.args.max_length).total_length == 160


def test_the_sampler_and_shed_flags_reach_sample_generate(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(intrinsic.sample, "generate", lambda m, t, prompts, **kw: seen.append(kw) or
                        [SimpleNamespace(text="some words", tokens=[5])] * len(prompts))
    intrinsic.main(["--prompts", write_prompts(tmp_path), "--output", str(tmp_path / "out"), "--sampler", "ddim",
                    "--shed", "4"])
    assert seen and {(kw["sampler"], kw["shed"]) for kw in seen} == {("ddim", 4)}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())  # and the key of the results
    seen.clear()
    intrinsic.main(["--prompts", write_prompts(tmp_path), "--output", str(tmp_path / "out"), "--sampler", "ddim"])
    assert seen and json.loads((tmp_path / "out" / "metrics.json").read_text())["fingerprint"] != metrics["fingerprint"]


# -----------------------------------------------------------------------------
# Refused runs: one line, exit status 2, no output changed


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Prompt files (good, empty, with a bad gap) and the output of a finished run."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "empty.jsonl").write_text("\n \n")
    (root / "gap.jsonl").write_text(json.dumps({"prompt": "To be <mask:³> be"}) + "\n")
    (root / "file").write_text("not a folder")
    intrinsic.main(["--prompts", str(root / "p.jsonl"), "--steps", "1", "--length", "2", "--limit", "2",
                    "--output", str(root / "earlier")])
    return {"root": root, "p": str(root / "p.jsonl"), "empty": str(root / "empty.jsonl"),
            "gap": str(root / "gap.jsonl"), "rm": os.path.join(ROOT, "models", "tess2-shakespeare-rm")}


REFUSED = [  # (flags, a phrase of the message); {name} is a path of the `inputs` fixture
    (["--limit", "0"], "--limit must be a positive integer, got 0"),
    (["--limit", "-1"], "--limit must be a positive integer, got -1"),
    (["--length", "0"], "--length must be a positive integer, got 0"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--steps", "1e20"], "--steps must be a positive integer below 2**63, got 1e20"),
    (["--top-p", "0"], "--top-p must be a number in (0, 1], got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--guidance-steps", "0"], "--guidance-steps must be a positive integer, got 0"),
    (["--seed", str(2**70)], f"--seed must be a whole number in [0, 2**63), got {2**70}"),
    (["--eta", "-1"], "--eta must be a finite number >= 0, got -1"),
    (["--eta", "1e39"], "--eta must be a finite number >= 0, got 1e39, over float32's largest"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (["--shed", "0"], "--shed must be a positive integer, got 0"),
    (["--shed", "1e20"], "--shed must be a positive integer below 2**63, got 1e20"),
    (["--scorer", SHIPPED], f"--scorer {SHIPPED} is a MistralForDiffusionLM: perplexity is measured under a causal"),
    (["--scorer", "{rm}"], "is a MistralForSequenceClassification: perplexity is measured under a causal"),
    (["--model", "{rm}"], "the model is a MistralForSequenceClassification, not a diffusion model"),
    (["--reward-model", SHIPPED], "the reward model must have a score head"),
    (["--model", "{root}/missing"], "no checkpoint directory"),
    (["--prompts", "{empty}"], "--prompts {empty}: no prompts in it"),
    (["--prompts", "{root}/missing.jsonl"], "No such file or directory"),
    (["--prompts", "{gap}"], "<mask:³> in prompt 'To be <mask:³> be': '³' is not a number written in the digits 0-9"),
    (["--length", "5000"], "prompt 0 has 28 tokens and needs rows of 5028 positions, but the model reads at most 1024"),
    (["--device", "cpu:5"], "--device cpu:5: a CPU has no index: use cpu"),
    (["--output", "{root}/file"], "--output {root}/file is a file: give a folder"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_a_refused_run_is_one_line_and_changes_no_output(flags, message, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("a refused run sampled"))
    flags = [f.format(**inputs) for f in flags]
    outputs = [inputs["root"] / "file"] if "--output" in flags else \
        [tmp_path / "new", shutil.copytree(inputs["root"] / "earlier", tmp_path / "earlier")]
    for out in outputs:
        argv = ["--prompts", inputs["p"], "--steps", "1", "--length", "2", "--output", str(out)]
        assert_refused(intrinsic.main, "eval.intrinsic", argv, flags, out, message.format(**inputs), capsys)


def test_the_same_run_again_samples_nothing_and_another_replaces_both_files(inputs, tmp_path, monkeypatch, capsys):
    out = shutil.copytree(inputs["root"] / "earlier", tmp_path / "earlier")
    before = folder_hash(out)
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("a finished run sampled again"))
    intrinsic.main(["--prompts", inputs["p"], "--steps", "1", "--length", "2", "--limit", "2", "--output", str(out)])
    assert "holds this run's metrics: nothing to do" in capsys.readouterr().out and folder_hash(out) == before
    monkeypatch.setattr(sample, "generate", lambda m, t, prompts, **kw: [SimpleNamespace(text=f"new {kw['seed']}",
                                                                                       tokens=[5]) for _ in prompts])
    intrinsic.main(["--prompts", inputs["p"], "--steps", "1", "--length", "3", "--output", str(out)])  # 4 prompts
    texts = [json.loads(line)["text"] for line in (out / "generations.jsonl").read_text().splitlines()]
    assert texts == ["new 0"] * 4 and json.loads((out / "metrics.json").read_text())["n"] == 4


def test_answers_all_empty_are_no_measurement(inputs, tmp_path, monkeypatch, capsys):
    """A model that writes only newlines is said to, and the earlier results stay as they were."""
    out = shutil.copytree(inputs["root"] / "earlier", tmp_path / "earlier")
    before = folder_hash(out)
    monkeypatch.setattr(sample, "generate", lambda m, t, prompts, **kw: [SimpleNamespace(text="\n\n", tokens=[9, 9])
                                                                         for _ in prompts])
    with pytest.raises(SystemExit) as stop:
        run_cli(intrinsic.main, "eval.intrinsic", ["--prompts", inputs["p"], "--steps", "1", "--output", str(out)])
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (  # after the progress line
        "eval.intrinsic: error: all 4 answers are empty, nothing to measure; the first: the model produced only "
        "newlines: 2 tokens, '\\n\\n'")
    assert folder_hash(out) == before
