"""eval/alpaca.py: the model-outputs file alpaca-eval reads, and its judge run offline."""
import json
import os

import pytest

alpaca_eval = pytest.importorskip("alpaca_eval")  # requirements-eval.txt

import eval.alpaca as alpaca  # noqa: E402
from support.cli import run_cli  # noqa: E402

PROMPTS = [{"instruction": "Write a line about the sea.", "dataset": "helpful_base"},
           {"instruction": "Name a play by Shakespeare.", "dataset": "oasst"},
           {"instruction": "Say hello.", "dataset": "koala"}]


def judge_config(tmp_path, prefers: int):
    """A local annotator that always ranks output `prefers` (1: the reference, 2: the model) first,
    through alpaca_eval's own prompt template, ranking parser and pairwise annotator, with no network."""
    template = os.path.join(os.path.dirname(alpaca_eval.__file__), "evaluators_configs", "alpaca_eval_gpt4",
                            "alpaca_eval.txt")
    ranking = [{"model": "model_1", "rank": 1 if prefers == 1 else 2},
               {"model": "model_2", "rank": 2 if prefers == 1 else 1}]
    cfg = tmp_path / f"judge{prefers}" / "configs.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"judge{prefers}:\n  prompt_template: \"{template}\"\n  fn_completions: test_completions\n"
                   f"  completions_kwargs:\n    value: \"{ranking}\"\n  fn_completion_parser: ranking_parser\n"
                   "  is_randomize_output_order: false\n  batch_size: 1\n")
    return str(cfg)


@pytest.mark.parametrize("prefers,win_rate", [(2, 100.0), (1, 0.0)])
def test_outputs_file_and_offline_judge(tmp_path, monkeypatch, capsys, prefers, win_rate):
    calls = []

    def stub(model, tok, prompts, **kwargs):
        calls.append((list(prompts), kwargs))
        return [f"  answer to {p}\n" for p in prompts]

    monkeypatch.setattr(alpaca.sample, "generate", stub)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps([dict(p, output="a reference answer", generator="ref") for p in PROMPTS]))
    out = tmp_path / "out"
    alpaca.main(["--prompts", str(prompts), "--output", str(out), "--batch-size", "2", "--steps", "3",
                 "--generator", "tess2-mini", "--annotators-config", judge_config(tmp_path, prefers),
                 "--reference-outputs", str(ref)])
    # what alpaca-eval itself reads back
    df = alpaca_eval.utils.load_or_convert_to_dataframe(str(out / "model_outputs.json"))
    assert list(df["instruction"]) == [p["instruction"] for p in PROMPTS]
    assert list(df["output"]) == [f"answer to {p['instruction']}" for p in PROMPTS]
    assert set(df["generator"]) == {"tess2-mini"}
    assert [c[1]["seed"] for c in calls] == [0, 2] and all(c[1]["chat"] and c[1]["steps"] == 3 for c in calls)
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["tess2-mini"]["win_rate"] == pytest.approx(win_rate)
    assert "win rate" in capsys.readouterr().out


def test_a_stopped_run_resumes_without_sampling_again(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    monkeypatch.setattr(alpaca.sample, "generate", lambda m, t, ps, **k: [f"r {p}" for p in ps])
    alpaca.main(["--prompts", str(prompts), "--output", str(tmp_path / "o")])
    monkeypatch.setattr(alpaca.sample, "generate", lambda *a, **k: pytest.fail("sampled again"))
    alpaca.main(["--prompts", str(prompts), "--output", str(tmp_path / "o")])
    outputs = json.loads((tmp_path / "o" / "model_outputs.json").read_text())
    assert [o["output"] for o in outputs] == [f"r {p['instruction']}" for p in PROMPTS]


def test_a_judge_that_needs_a_key_is_refused_up_front(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(alpaca.main, "eval.alpaca",
                ["--output", str(tmp_path / "o"), "--annotators-config", "alpaca_eval_gpt4"])
    assert e.value.code == 2 and "OPENAI_API_KEY" in capsys.readouterr().err


def test_sampling_flags_left_out_are_the_checkpoints(tmp_path, monkeypatch):
    """Without sampling flags the outputs are sampled with the checkpoint's settings (and the chat
    template: AlpacaEval's prompts are instructions)."""
    from support.prompts import settings_for
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    seen = []
    monkeypatch.setattr(alpaca.sample, "generate", lambda m, t, ps, **kw: seen.append((m, kw)) or ["r"] * len(ps))
    alpaca.main(["--prompts", str(prompts), "--output", str(tmp_path / "o")])
    model, kw = seen[0]
    sampling = {k: v for k, v in kw.items() if k not in ("reward_model", "reward_tokenizer", "seed", "batch_size")}
    cfg, n = model.generation_config, model.args.max_length
    assert settings_for(cfg, n, **sampling) == settings_for(cfg, n, chat=True) and kw["seed"] == 0
