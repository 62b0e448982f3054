"""eval/alpaca.py: the model-outputs file alpaca-eval reads, and its judge run offline."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest

alpaca_eval = pytest.importorskip("alpaca_eval")  # requirements-eval.txt

import eval.alpaca as alpaca  # noqa: E402
from support.cli import run_cli  # noqa: E402
from conftest import assert_refused, folder_hash  # noqa: E402

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
        return [SimpleNamespace(text=f"  answer to {p}\n", tokens=[5]) for p in prompts]

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
    monkeypatch.setattr(alpaca.sample, "generate", lambda m, t, ps, **k: [SimpleNamespace(text=f"r {p}", tokens=[5])
                                                                           for p in ps])
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
    monkeypatch.setattr(alpaca.sample, "generate", lambda m, t, ps, **kw: seen.append((m, kw)) or
                        [SimpleNamespace(text="r", tokens=[5])] * len(ps))
    alpaca.main(["--prompts", str(prompts), "--output", str(tmp_path / "o")])
    model, kw = seen[0]
    sampling = {k: v for k, v in kw.items() if k not in ("reward_model", "reward_tokenizer", "seed", "batch_size",
                                                         "details")}
    cfg, n = model.generation_config, model.args.max_length
    assert settings_for(cfg, n, **sampling) == settings_for(cfg, n, chat=True) and kw["seed"] == 0
    seen.clear()
    alpaca.main(["--prompts", str(prompts), "--output", str(tmp_path / "o"), "--sampler", "ddim", "--shed", "5"])
    assert seen and {(kw["sampler"], kw["shed"]) for _, kw in seen} == {("ddim", 5)}


# -----------------------------------------------------------------------------
# Refused runs: one line, exit status 2, no output changed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "models", "tess2-shakespeare")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Instruction files (good, empty, not JSON, without instructions) and the output of a finished run."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "p.json").write_text(json.dumps(PROMPTS))
    (root / "empty.json").write_text("[]")
    (root / "bad.jsonl").write_text(json.dumps(PROMPTS[0]) + "\n{\"instruction\": \n")
    (root / "other.json").write_text(json.dumps([{"question": "Say hello."}]))
    (root / "file").write_text("not a folder")
    alpaca.main(["--prompts", str(root / "p.json"), "--steps", "1", "--length", "2", "--output", str(root / "earlier")])
    return {"root": root, "p": str(root / "p.json"), "rm": os.path.join(ROOT, "models", "tess2-shakespeare-rm")}


REFUSED = [  # (flags, a phrase of the message); {name} is a path of the `inputs` fixture
    (["--total-length", "50"], "--length and --total-length both set the length of a row: give one"),
    (["--limit", "0"], "--limit must be a positive integer, got 0"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--length", "0"], "--length must be a positive integer, got 0"),
    (["--batch-size", "-2"], "--batch-size must be a positive integer, got -2"),
    (["--top-p", "1.5"], "--top-p must be a number in (0, 1], got 1.5"),
    (["--seed", str(2**63)], f"--seed must be a whole number in [0, 2**63), got {2**63}"),
    (["--eta", "nan"], "--eta must be a finite number >= 0, got nan"),
    (["--guidance-steps", "0"], "--guidance-steps must be a positive integer, got 0"),
    (["--alpaca-eval-version", "3"], "argument --alpaca-eval-version: invalid choice: 3"),
    (["--prompts", "{root}/empty.json"], "--prompts {root}/empty.json holds no instructions"),
    (["--prompts", "{root}/bad.jsonl"], "{root}/bad.jsonl, line 2: not JSON"),
    (["--prompts", "{root}/other.json"], "expected a JSON list (or JSONL) of objects with an \"instruction\" string"),
    (["--model", "{rm}"], "the model is a MistralForSequenceClassification, not a diffusion model"),
    (["--reward-model", SHIPPED], "the reward model must have a score head"),
    (["--eta", "1", "--reward-model", "{root}"], "has no config.json: not a Hugging Face checkpoint directory"),
    (["--length", "2000"], "prompt 0 has 26 tokens and needs rows of 2026 positions, but the model reads at most 1024"),
    (["--annotators-config", "alpaca_eval_gpt4"], "the judge alpaca_eval_gpt4 calls OpenAI: set OPENAI_API_KEY"),
    (["--reference-outputs", "{root}/missing.json"], "--reference-outputs {root}/missing.json: no such file"),
    (["--device", "cpu:5"], "--device cpu:5: a CPU has no index: use cpu"),
    (["--output", "{root}/file"], "--output {root}/file is a file: give a folder"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_a_refused_run_is_one_line_and_changes_no_output(flags, message, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(alpaca.sample, "generate", lambda *a, **k: pytest.fail("a refused run sampled"))
    flags = [f.format(**inputs) for f in flags]
    outputs = [inputs["root"] / "file"] if "--output" in flags else \
        [tmp_path / "new", shutil.copytree(inputs["root"] / "earlier", tmp_path / "earlier")]
    for out in outputs:
        argv = ["--prompts", inputs["p"], "--steps", "1", "--length", "2", "--output", str(out)]
        assert_refused(alpaca.main, "eval.alpaca", argv, flags, out, message.format(**inputs), capsys)


def test_another_model_samples_anew_into_the_same_output(inputs, tmp_path, monkeypatch):
    """The generations are keyed by the model's files, not its name: a model saved under the same
    folder name elsewhere, with other weights, is sampled again."""
    import torch
    from model import Transformer
    out = shutil.copytree(inputs["root"] / "earlier", tmp_path / "earlier")
    other = tmp_path / "elsewhere" / "tess2-shakespeare"
    model = Transformer.from_pretrained(SHIPPED, verbose=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(str(other), tokenizer_from=SHIPPED)
    seen = []
    monkeypatch.setattr(alpaca.sample, "generate", lambda m, t, ps, **kw: seen.extend(ps) or
                        [SimpleNamespace(text="new", tokens=[5]) for _ in ps])
    argv = ["--prompts", inputs["p"], "--steps", "1", "--length", "2", "--output", str(out)]
    alpaca.main(argv)
    assert seen == []  # the same model: every answer is in generations.jsonl
    alpaca.main(argv + ["--model", str(other)])
    assert seen == [p["instruction"] for p in PROMPTS]
    assert [o["output"] for o in json.loads((out / "model_outputs.json").read_text())] == ["new"] * 3
