"""eval/intrinsic.py and eval/sweep.py: adaptation metrics (Tables 1-2) and the Figure 3 sweeps."""
import argparse
import json
import math
import os

import pytest
import torch

mauve = pytest.importorskip("mauve")  # requirements-eval.txt

import eval.intrinsic as intrinsic  # noqa: E402
import eval.sweep as sweep  # noqa: E402
from model import Transformer, preset  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402

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
    monkeypatch.setattr(sweep.sample, "generate", lambda *a, **k: pytest.fail("a finished point ran again"))
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
                        ["some words"] * len(prompts))
    intrinsic.main(["--prompts", write_prompts(tmp_path), "--output", str(tmp_path / "out")])
    model, kw = seen[0]
    sampling = {k: v for k, v in kw.items() if k not in ("reward_model", "reward_tokenizer")}
    cfg = model.generation_config
    assert settings_for(cfg, model.args.max_length, **sampling) == settings_for(cfg, model.args.max_length)
    assert settings_for(cfg, model.args.max_length).total_length == 160
