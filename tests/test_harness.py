"""eval/harness.py and eval/tasks/: TESS 2 through lm-evaluation-harness, offline.

Each task runs end to end through lm-eval on a few items written here as JSONL. Where the answers
must be known, sample.generate is replaced by a stub that answers each prompt from a table (a
real model cannot be steered to a chosen text); it records what it was asked. The shipped
miniature model then runs one task through the whole harness for real.
"""
import json
import os
import shutil

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # requirements-eval.txt

import eval.harness as harness  # noqa: E402
import sample  # noqa: E402
from eval.tasks import paper  # noqa: E402
from model import Transformer, preset  # noqa: E402
from support.cli import run_cli  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402
from conftest import folder_hash  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "models", "tess2-shakespeare")
LM_EVAL_TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")


@pytest.fixture(scope="module")
def manager():
    return harness.task_manager(builtin=False)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(SHIPPED)


@pytest.fixture(scope="module")
def tiny(tok):
    """A random model of the shipped tokenizer's vocabulary that reads 4096 positions (stubbed runs never
    call it; it only has to accept the prompts)."""
    torch.manual_seed(0)
    args = preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=4096, sliding_window=None,
                  timestep_embed=True, causal=False)
    return Transformer(args).init_weights().eval()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Stub:
    """Stands in for sample.generate: answers the prompt that ends with a known question, records the calls."""

    def __init__(self, answers: dict):
        self.answers, self.calls = answers, []

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.calls.append((list(prompts), kwargs))
        out = []
        for p in prompts:
            hits = [a for q, a in self.answers.items() if p.rstrip().endswith(q)]
            assert len(hits) == 1, f"the stub knows no answer to ...{p[-80:]!r}"
            out.append(hits[0])
        return out


def run(monkeypatch, tmp_path, manager, tiny, tok, yaml, files, answers, **lm_args):
    stub = Stub(answers)
    monkeypatch.setattr(harness.sample, "generate", stub)
    lm = harness.TESS2(model=tiny, tokenizer=tok, output=str(tmp_path / "out"), progress_every=0, **lm_args)
    task = harness.local_task(manager, yaml, files)
    res = harness.evaluate(lm, [task], manager, str(tmp_path / "out"), bootstrap_iters=0)
    return res["results"][task["task"]], stub


# -----------------------------------------------------------------------------
# The paper's tasks, scored exactly: all right, all wrong, a known mix

GSM8K = [("Tom has 40 apples and buys 2 more. How many apples does he have?", "40 + 2 = 42", "42"),
         ("Ann had 9 pens and lost 3. How many are left?", "9 - 3 = 6", "6"),
         ("A box holds 5 eggs. How many eggs are in 3 boxes?", "5 * 3 = 15", "15")]


def gsm8k_answer(mode, j, gold):
    right = mode == "right" or (mode == "mix" and j != 1)
    # a new question after the answer: its number would be "the last number" unless "Q:" cuts it
    return f"So the answer is {gold if right else int(gold) + 1}.\n\nQ: What is 7 + 100?"


@pytest.mark.parametrize("mode,expected", [("right", 1.0), ("wrong", 0.0), ("mix", 2 / 3)])
def test_gsm8k_cot_last_number_after_stop_strings(monkeypatch, tmp_path, manager, tiny, tok, mode, expected):
    docs = [{"question": q, "answer": f"{w}\n#### {a}"} for q, w, a in GSM8K]
    files = {"test": write_jsonl(tmp_path / "gsm8k.jsonl", docs)}
    answers = {f"Q: {q}\nA:": gsm8k_answer(mode, j, a) for j, (q, _, a) in enumerate(GSM8K)}
    r, stub = run(monkeypatch, tmp_path, manager, tiny, tok, os.path.join(LM_EVAL_TASKS, "gsm8k", "gsm8k-cot.yaml"),
                  files, answers)
    assert r["exact_match,flexible-extract"] == pytest.approx(expected)
    prompts, kwargs = stub.calls[0]
    assert prompts[0].startswith("Q: There are 15 trees in the grove.")  # the 8 chain-of-thought examples
    assert sum(p.count("The answer is") for p in prompts[:1]) == 8
    assert kwargs["chat"] is True and kwargs["length"] == 256  # lm-eval's default max_gen_toks


SQUAD_TRAIN = [{"id": str(j), "title": f"T{j}", "context": f"Context {j}.", "question": f"Train question {j}?",
                "answers": {"text": [f"answer {j}"], "answer_start": [0]}} for j in range(4)]
SQUAD = [("Which team won Super Bowl 50?", ["Denver Broncos", "The Denver Broncos"], "The Denver Broncos.",
          "the Carolina team"),
         ("Who lost Super Bowl 50?", ["Carolina Panthers"], "Carolina Panthers", "the Carolina team"),
         ("Where was Super Bowl 50 played?", ["Santa Clara"], "Santa Clara, California", "Paris")]


@pytest.mark.parametrize("mode,f1,em", [("right", (1 + 1 + 2 * (2 / 3) / (1 + 2 / 3)) / 3, 2 / 3),
                                        ("wrong", 0.5 / 3, 0.0),
                                        ("mix", (1 + 0.5 + 0) / 3, 1 / 3)])
def test_squad_token_f1_and_exact_match(monkeypatch, tmp_path, manager, tiny, tok, mode, f1, em):
    # by hand: "Santa Clara, California" vs "Santa Clara": P = 2/3, R = 1, F1 = 0.8, not exact.
    # "the Carolina team" vs "Carolina Panthers": "carolina team" / "carolina panthers", F1 = 0.5.
    docs = [{"id": f"v{j}", "title": "Super Bowl 50", "context": "Super Bowl 50 was an American football game.",
             "question": q, "answers": {"text": g, "answer_start": [0] * len(g)}}
            for j, (q, g, _, _) in enumerate(SQUAD)]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", SQUAD_TRAIN),
             "validation": write_jsonl(tmp_path / "val.jsonl", docs)}
    pick = {"right": [2, 2, 2], "wrong": [3, 3, 3], "mix": [2, 3, 3]}[mode]
    answers = {f"Question: {row[0]}\nAnswer:": row[pick[j]] + "\nQuestion: Who else?" for j, row in enumerate(SQUAD)}
    r, stub = run(monkeypatch, tmp_path, manager, tiny, tok, "tess2_squad", files, answers)
    assert r["f1,none"] == pytest.approx(f1)
    assert r["exact_match,none"] == pytest.approx(em)
    prompts, kwargs = stub.calls[0]
    assert prompts[0].count("Background: ") == 4 and prompts[0].count("Title: ") == 4  # 3 examples + the item
    assert prompts[0].startswith("Title: T") and kwargs["length"] == 50


TRIVIA = [("Which band recorded Abbey Road", ["The Beatles", "Beatles"], "It was the Beatles, of course", "Queen"),
          ("How many moons does Earth have", ["1", "one"], "Just one.", "10 of them"),
          ("What is the capital of France", ["Paris"], "paris", "Lyon")]


@pytest.mark.parametrize("mode,expected", [("right", 1.0), ("wrong", 0.0), ("mix", 1 / 3)])
def test_triviaqa_any_alias_appears_as_whole_words(monkeypatch, tmp_path, manager, tiny, tok, mode, expected):
    docs = [{"question": q, "question_id": str(j), "answer": {"aliases": a, "value": a[0]}}
            for j, (q, a, _, _) in enumerate(TRIVIA)]
    train = [{"question": f"Train {j}", "question_id": f"t{j}", "answer": {"aliases": [f"x{j}"], "value": f"x{j}"}}
             for j in range(3)]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", train),
             "validation": write_jsonl(tmp_path / "val.jsonl", docs)}
    pick = {"right": [2, 2, 2], "wrong": [3, 3, 3], "mix": [2, 3, 3]}[mode]  # "10 of them" is not "1"
    answers = {f"Question: {row[0]}\nAnswer:": row[pick[j]] + "\nQuestion: next" for j, row in enumerate(TRIVIA)}
    r, stub = run(monkeypatch, tmp_path, manager, tiny, tok, "tess2_triviaqa", files, answers)
    assert r["alias_match,none"] == pytest.approx(expected)
    assert stub.calls[0][0][0].count("Question: ") == 3  # 2 examples + the item


IFEVAL = [{"key": 1, "prompt": "Write about cats, in lowercase letters only.",
           "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
          {"key": 2, "prompt": "Describe the sea in fewer than 3 sentences.",
           "instruction_id_list": ["length_constraints:number_sentences"],
           "kwargs": [{"relation": "less than", "num_sentences": 3}]},
          {"key": 3, "prompt": "Say hello, in lowercase letters only.",
           "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}]


@pytest.mark.parametrize("mode,loose,strict", [("right", 1.0, 1.0), ("wrong", 0.0, 0.0), ("mix", 2 / 3, 1 / 3)])
def test_ifeval_loose_and_strict_offline(monkeypatch, tmp_path, manager, tiny, tok, mode, loose, strict):
    cats = "the cats sleep on the warm mat all day and dream of fish."
    hello = "hello there, my friend, how are you today?"
    right = [cats, "The sea is wide. It is blue.", hello]
    wrong = [cats.upper(), "One. Two. Three. Four.", hello.title()]
    # mix: item 1 passes only loosely (its first line is dropped), item 2 passes, item 3 fails.
    # The sentence count runs NLTK-free punkt (paper.py): "Mr." ends no sentence. Language detection
    # (English is part of the lowercase check) is seeded in paper.py, so the scores are reproducible.
    mix = ["Sure!\n" + cats, "Mr. Smith saw the sea. It was calm.", hello.upper()]
    texts = {"right": right, "wrong": wrong, "mix": mix}[mode]
    files = {"train": write_jsonl(tmp_path / "ifeval.jsonl", IFEVAL)}
    r, stub = run(monkeypatch, tmp_path, manager, tiny, tok, "tess2_ifeval", files,
                  {d["prompt"]: t for d, t in zip(IFEVAL, texts)})
    assert r["prompt_level_loose_acc,none"] == pytest.approx(loose)
    assert r["prompt_level_strict_acc,none"] == pytest.approx(strict)
    assert stub.calls[0][1]["length"] == 1280 and stub.calls[0][1]["chat"] is True


@pytest.mark.parametrize("mode,expected", [("right", 1.0), ("wrong", 0.0), ("mix", 0.5)])
def test_bbh_cot_the_answer_is(monkeypatch, tmp_path, manager, tiny, tok, mode, expected):
    docs = [{"input": "not ( True ) and ( True ) is", "target": "False"},
            {"input": "True and not not ( not False ) is", "target": "True"}]
    files = {"test": write_jsonl(tmp_path / "bbh.jsonl", docs)}
    right = ["not True is False. So the answer is False.\n\nQ: not True is", "So the answer is True.\n\nQ:"]
    wrong = ["So the answer is True.", "So the answer is False."]
    texts = {"right": right, "wrong": wrong, "mix": [right[0], wrong[1]]}[mode]
    answers = {f"Q: {d['input']}\nA: Let's think step by step.": t for d, t in zip(docs, texts)}
    yaml = os.path.join(LM_EVAL_TASKS, "bbh", "cot_fewshot", "boolean_expressions.yaml")
    r, _ = run(monkeypatch, tmp_path, manager, tiny, tok, yaml, files, answers)
    assert r["exact_match,get-answer"] == pytest.approx(expected)


def test_paper_item_samples_are_fixed_and_sized():
    datasets = pytest.importorskip("datasets")
    docs = datasets.Dataset.from_dict({"i": list(range(3000))})
    a, b = paper.triviaqa_docs(docs), paper.triviaqa_docs(docs)
    assert len(a) == 2000 and a["i"] == b["i"] and a["i"] != list(range(2000))
    assert len(paper.squad_docs(docs)) == 512 and len(paper.squad_docs(docs.select(range(10)))) == 10


# -----------------------------------------------------------------------------
# generate_until: batching, seeds, stop strings, resume, progress


class Request:  # what lm-eval hands a model: .args
    def __init__(self, *args):
        self.args = args


def test_generate_until_groups_by_length_seeds_by_position_and_resumes(monkeypatch, tmp_path, tiny, tok, capsys):
    stub = Stub({"short": "A.\nB", "a longer prompt": "C. D", "x": "cut. here"})
    monkeypatch.setattr(harness.sample, "generate", stub)
    out = str(tmp_path / "out")
    lm = harness.TESS2(model=tiny, tokenizer=tok, batch_size=2, seed=10, output=out, progress_every=0)
    reqs = [Request("a longer prompt", {"until": ["\n"], "max_gen_toks": 32}),
            Request("short", {"until": ["\n"], "max_gen_toks": 32}),
            Request("x", {"until": ".", "max_gen_toks": 8})]
    assert lm.generate_until(reqs) == ["C. D", "A.", "cut"]
    # sorted by (max_gen_toks, length): ["x"] alone (8 positions), then ["short", "a longer prompt"]
    assert [(c[0], c[1]["length"], c[1]["seed"], c[1]["batch_size"]) for c in stub.calls] == [
        (["x"], 8, 10, 1), (["short", "a longer prompt"], 32, 11, 2)]
    assert "tess2 generate_until: 3/3 items" in capsys.readouterr().err
    with open(os.path.join(out, "generations.jsonl")) as f:
        assert sorted(json.loads(line)["raw"] for line in f) == ["A.\nB", "C. D", "cut. here"]
    # a second run with the same settings reads every generation back; other settings sample anew
    monkeypatch.setattr(harness.sample, "generate", lambda *a, **k: pytest.fail("resumed run sampled again"))
    again = harness.TESS2(model=tiny, tokenizer=tok, batch_size=2, seed=10, output=out)
    assert again.generate_until(reqs) == ["C. D", "A.", "cut"]
    other = harness.TESS2(model=tiny, tokenizer=tok, batch_size=2, seed=11, output=out)
    with pytest.raises(pytest.fail.Exception):
        other.generate_until(reqs)


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert harness.cut_at_stop("a Q b \n\n c", ["\n\n", "Q"]) == "a "
    assert harness.cut_at_stop("abc", []) == "abc" and harness.cut_at_stop("abc", "c") == "ab"


def test_progress_reports_items_per_second_and_eta():
    import io
    s = io.StringIO()
    p = harness.Progress("generate_until", 4, every=0, stream=s)
    p.t0 -= 10  # 10 s ago
    p.update(2)
    line = s.getvalue()
    assert "2/4 items" in line and "0.20 items/s" in line and "ETA 0:00:10" in line


# -----------------------------------------------------------------------------
# The likelihood estimate


def constant_model(favoured: int, V: int = 64):
    """A diffusion model whose every prediction puts (nearly) all mass on one token: no attention or
    MLP output, an embedding with a constant first coordinate, a final norm that keeps only it, and an
    LM head that maps it to token `favoured`: its logit is 50 sqrt(D) = 400 (D = 64), every other 0."""
    args = preset("tiny", vocab_size=V, timestep_embed=True, causal=False)
    m = Transformer(args).init_weights().eval()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.embed_tokens.weight.zero_()
        m.embed_tokens.weight[:, 0] = 1.0  # p @ E and E[w] are both (1, 0, ..., 0): after the norm sqrt(D) e_0
        m.model.norm.weight.zero_()
        m.model.norm.weight[0] = 1.0
        m.lm_head.weight.zero_()
        m.lm_head.weight[favoured, 0] = 50.0
    return m


def test_likelihood_ranks_the_continuation_the_model_favours():
    m = constant_model(favoured=7)
    right, r_greedy = harness.estimate_loglikelihood(m, [1, 5, 6], [7, 7], samples=4, seed=0)
    wrong, w_greedy = harness.estimate_loglikelihood(m, [1, 5, 6], [9, 7], samples=4, seed=0)
    assert right > wrong and r_greedy and not w_greedy
    assert right == pytest.approx(0.0, abs=1e-6) and wrong == pytest.approx(-400.0, rel=1e-3)


def test_likelihood_estimate_is_the_documented_monte_carlo_mean(tiny):
    """Restated: K = 2 draws, t_k = floor((k + 1/2) T / K), eps_k from seed + k, self-conditioned on the
    prediction at t_k + 1 with the same eps; the mean over draws of the continuation's summed log-probs."""
    import tess2
    torch.manual_seed(1)
    m = Transformer(preset("tiny", timestep_embed=True, causal=False)).init_weights().eval()
    ctx, cont, T, V = [1, 5, 6, 8], [9, 10, 11], 5000, m.args.vocab_size
    ids = torch.tensor([ctx + cont])
    span = torch.tensor([[False] * 4 + [True] * 3])
    ab = tess2.alpha_bar(torch.arange(T, dtype=torch.float64) / T).float()
    want = 0.0
    for k, t in enumerate([1250, 3750]):
        g = torch.Generator().manual_seed(3 + k)
        eps = torch.empty(1, 7, V).normal_(generator=g)
        simplex = 2 * 5.0 * torch.nn.functional.one_hot(ids, V) - 5.0  # k = 5
        with torch.no_grad():
            s1 = ab[t + 1].sqrt() * simplex + (1 - ab[t + 1]).sqrt() * 5.0 * eps
            prev = tess2.predict(m, ids, span, s1, torch.tensor([(t + 1) / T]))
            s0 = ab[t].sqrt() * simplex + (1 - ab[t]).sqrt() * 5.0 * eps
            logp = torch.log_softmax(tess2.predict(m, ids, span, s0, torch.tensor([t / T]), prev)[0, 4:], -1)
        want += sum(logp[j, c].item() for j, c in enumerate(cont)) / 2
    got, _ = harness.estimate_loglikelihood(m, ctx, cont, samples=2, seed=3, chunk=1)
    assert got == pytest.approx(want, rel=1e-4)
    assert harness.estimate_loglikelihood(m, ctx, cont, samples=2, seed=3, chunk=2)[0] == pytest.approx(got, rel=1e-5)
    assert harness.estimate_loglikelihood(m, ctx, cont, samples=2, seed=4)[0] != got  # another seed, other noise


def test_multiple_choice_task_through_lm_eval(tmp_path, manager, tok):
    """A multiple-choice task (loglikelihood requests): the choice the model favours wins every item."""
    favoured = tok.encode(" lord")
    assert len(favoured) == 1 and len(tok.encode(" king")) == 1
    m = constant_model(favoured[0], V=tok.vocab_size)
    docs = [{"q": "Who rules?", "gold": 0}, {"q": "Who speaks?", "gold": 0}, {"q": "Who is crowned?", "gold": 1}]
    task = {"task": "yes_no", "dataset_path": "json", "dataset_kwargs": {"data_files": {
        "test": write_jsonl(tmp_path / "yn.jsonl", docs)}}, "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{q}}", "doc_to_choice": ["lord", "king"], "doc_to_target": "gold",
        "metric_list": [{"metric": "acc"}]}
    lm = harness.TESS2(model=m, tokenizer=tok, chat=False, mc_samples=2, progress_every=0)
    res = harness.evaluate(lm, [task], manager, bootstrap_iters=0)
    assert res["results"]["yes_no"]["acc,none"] == pytest.approx(2 / 3)  # always " lord": right on 2 of 3
    assert len(lm.scores.records) == 6  # 3 items x 2 choices, each estimated once


def test_loglikelihood_rolling_sums_disjoint_windows(tok):
    m = constant_model(favoured=tok.encode(" lord")[0], V=tok.vocab_size)
    lm = harness.TESS2(model=m, tokenizer=tok, chat=False, mc_samples=1, progress_every=0)
    lm.max_len = 6  # windows of 4 tokens
    text = " lord" * 10
    (total,) = lm.loglikelihood_rolling([Request(text)])
    assert total == pytest.approx(0.0, abs=1e-4)  # every token is the favoured one
    assert len(lm.scores.records) == 3  # 10 tokens: windows of 4, 4, 2
    (worse,) = lm.loglikelihood_rolling([Request(" king" + " lord" * 9)])
    assert worse == pytest.approx(-400.0, rel=1e-3)


# -----------------------------------------------------------------------------
# The shipped miniature model through the whole harness, and the command line


def test_miniature_model_runs_a_task_through_the_command_line(tmp_path, tok, monkeypatch):
    seen = []
    real = sample.diffuse

    def spy(model, ids, *args, **kwargs):  # records the rows the model saw
        seen.extend(tok.tokenizer.decode(r, skip_special_tokens=False) for r in ids.tolist())
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(sample, "diffuse", spy)
    docs = [{"question": "Who says this in Hamlet? To be, or not to be", "question_id": "a",
             "answer": {"aliases": ["Hamlet"], "value": "Hamlet"}},
            {"question": "Who says this in Julius Caesar? Friends, Romans, countrymen", "question_id": "b",
             "answer": {"aliases": ["Antony"], "value": "Antony"}}]
    val = write_jsonl(tmp_path / "val.jsonl", docs)
    out = tmp_path / "out"
    harness.main(["--tasks", "tess2_triviaqa", "--data-files", f"train={val},validation={val}", "--steps", "2",
                  "--num-fewshot", "0", "--output", str(out), "--bootstrap-iters", "0"])
    res = json.loads((out / "results.json").read_text())["results"]["tess2_triviaqa"]
    with open(out / "generations.jsonl") as f:
        gens = [json.loads(line) for line in f]
    assert len(gens) == 2 and len(seen) == 2
    assert all(r.startswith("<s><|user|>\nQuestion: Who says this in ") and "\nAnswer:\n<|assistant|>\n" in r
               for r in seen)  # the Tulu template around each prompt, as the model saw it
    by_q = {g["context"].split("\n")[0][len("Question: "):]: g["raw"] for g in gens}
    want = sum(paper.triviaqa_results(d, [harness.cut_at_stop(by_q[d["question"]], ["\n"])])["alias_match"]
               for d in docs) / 2
    assert res["alias_match,none"] == want
    assert (out / "samples_tess2_triviaqa.jsonl").exists()


def test_command_line_mistakes_are_one_line(tmp_path, capsys):
    from support.cli import run_cli
    (tmp_path / "file").write_text("x")
    for argv, message in ((["--tasks", "tess2_squad", "--output", str(tmp_path / "file")], "is a file"),
                          (["--tasks", "tess2_squad,tess2_ifeval", "--data-files", "test=x.jsonl", "--output",
                            str(tmp_path / "o")], "one task"),
                          (["--tasks", "tess2_squad", "--data-files", "test=missing.jsonl", "--output",
                            str(tmp_path / "o")], "no such file"),
                          (["--tasks", "tess2_squad", "--data-files", "train", "--output", str(tmp_path / "o")],
                           "SPLIT=PATH")):
        with pytest.raises(SystemExit) as e:
            run_cli(harness.main, "eval.harness", argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_sampler_and_shed_flags_reach_the_model(tmp_path, monkeypatch):
    given = {}

    def spy(**kw):
        given.update(kw)
        raise ValueError("the spy stops here")
    monkeypatch.setattr(harness, "TESS2", spy)
    with pytest.raises(ValueError, match="the spy stops here"):
        harness.main(["--tasks", "tess2_squad", "--output", str(tmp_path / "o"), "--sampler", "ddim", "--shed", "3"])
    assert (given["sampler"], given["shed"]) == ("ddim", 3)
    assert not (tmp_path / "o").exists()  # a run that fails before its first result leaves no folder


def test_an_unknown_task_is_named(tmp_path, capsys, monkeypatch):
    from support.cli import run_cli
    ours_only = harness.task_manager
    monkeypatch.setattr(harness, "task_manager", lambda builtin=True: ours_only(builtin=False))  # skip lm-eval's index
    with pytest.raises(SystemExit) as e:
        run_cli(harness.main, "eval.harness", ["--tasks", "tess2_nope", "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "unknown task(s) tess2_nope" in capsys.readouterr().err


def test_registered_as_tess2_for_simple_evaluate(tmp_path, manager, monkeypatch):
    """lm-eval builds the model from its name and a model_args string."""
    docs = [{"question": "Which band recorded Abbey Road", "question_id": "a",
             "answer": {"aliases": ["The Beatles"], "value": "The Beatles"}}]
    val = write_jsonl(tmp_path / "val.jsonl", docs)
    stub = Stub({"Question: Which band recorded Abbey Road\nAnswer:": "The Beatles\n"})
    monkeypatch.setattr(harness.sample, "generate", stub)
    task = harness.local_task(manager, "tess2_triviaqa", {"train": val, "validation": val})
    res = lm_eval.simple_evaluate(model="tess2", model_args=f"pretrained={SHIPPED},steps=7,seed=3", tasks=[task],
                                  task_manager=manager, num_fewshot=0, bootstrap_iters=0)
    assert res["results"]["tess2_triviaqa"]["alias_match,none"] == 1.0
    assert stub.calls[0][1]["steps"] == 7 and stub.calls[0][1]["seed"] == 3


def test_a_long_context_keeps_bos_its_end_and_the_continuation(tok, monkeypatch):
    m = constant_model(favoured=tok.encode(" lord")[0], V=tok.vocab_size)
    lm = harness.TESS2(model=m, tokenizer=tok, chat=False, mc_samples=1, progress_every=0)
    lm.max_len = 8
    seen = []
    monkeypatch.setattr(harness, "estimate_loglikelihood",
                        lambda model, c, x, *a: seen.append((c, x)) or (0.0, True))
    lm.score_pairs([([1, 10, 11, 12, 13, 14, 15], [20, 21, 22])], "loglikelihood")
    assert seen == [([1, 12, 13, 14, 15], [20, 21, 22])]  # 8 positions: BOS, the last 4 of the context, 3
    with pytest.raises(ValueError, match="does not fit"):
        lm.score_pairs([([1], list(range(20, 28)))], "loglikelihood")


def test_sampling_settings_left_out_are_the_checkpoints(monkeypatch, tok):
    """No flag re-declares a sampling default: those left out come from the checkpoint's
    generation_config.json (as in sample.py), those given override them."""
    a = harness.parse_args(["--tasks", "tess2_squad", "--output", "o"])
    assert all(getattr(a, k) is None for k in ("steps", "top_p", "seed", "batch_size", "chat", "eta",
                                               "guidance_steps", "total_length", "sampler", "shed"))
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=tok.vocab_size, timestep_embed=True, causal=False)).init_weights()
    m.generation_config = {"steps": 3, "top_p": 0.5, "chat": False, "seed": 4, "guidance_steps": 2, "shed": 6}
    for lm_args, expected in (({}, (3, 0.5, False, 4, 2, "stochastic", 6)),
                              (dict(steps=7, argmax=True, chat=True, seed=1, sampler="ddim", shed="2"),
                               (7, None, True, 1, 2, "ddim", 2))):
        stub = Stub({"x": "y"})
        monkeypatch.setattr(harness.sample, "generate", stub)
        lm = harness.TESS2(model=m, tokenizer=tok, progress_every=0, **lm_args)
        assert lm.generate_until([Request("x", {"until": ["\n"], "max_gen_toks": 8})]) == ["y"]
        kw = stub.calls[0][1]
        assert (kw["steps"], kw["top_p"], kw["chat"], kw["seed"], kw["guidance_steps"], kw["sampler"],
                kw["shed"]) == expected
        assert kw["length"] == 8 and kw["total_length"] is None


# -----------------------------------------------------------------------------
# Refused runs: one line, exit status 2, no output changed


QUESTION = {"question": "Who says this in Hamlet? To be, or not to be", "question_id": "a",
            "answer": {"aliases": ["Hamlet"], "value": "Hamlet"}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Data files, good and malformed, and the output of a finished run (the shipped model, 1 step)."""
    root = tmp_path_factory.mktemp("inputs")
    texts = {"good.jsonl": json.dumps(QUESTION) + "\n" + json.dumps(dict(QUESTION, question_id="b")) + "\n",
             "notjson.jsonl": json.dumps(QUESTION) + "\n\n{'question': 'single quotes'}\n",
             "list.jsonl": json.dumps(QUESTION) + "\n" + json.dumps([QUESTION]) + "\n",
             "kind.jsonl": json.dumps(QUESTION) + "\n" + json.dumps(dict(QUESTION, answer="Hamlet")) + "\n",
             "nested.jsonl": json.dumps(QUESTION) + "\n" + json.dumps(dict(QUESTION, answer={"aliases": "Hamlet",
                                                                                           "value": "Hamlet"})) + "\n",
             "missing.jsonl": json.dumps(QUESTION) + "\n" + json.dumps({"question": "Q", "question_id": "c"}) + "\n",
             "unread.jsonl": json.dumps({"query": "Q", "question_id": "c", "answer": {"aliases": ["x"]}}) + "\n",
             "novalue.jsonl": json.dumps({"question": "Q", "question_id": "c", "answer": {"aliases": ["x"]}}) + "\n",
             "nullalias.jsonl": json.dumps(QUESTION) + "\n" + json.dumps(dict(QUESTION, answer={"aliases": None,
                                                                                              "value": "x"})) + "\n",
             "numbers.json": "[1, 2]", "empty.jsonl": "\n\n", "file": "not a folder"}
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / "latin1.jsonl").write_bytes(json.dumps(QUESTION).replace("Hamlet", "Hämlet").encode("latin-1"))
    good = root / "good.jsonl"
    harness.main(["--tasks", "tess2_triviaqa", "--data-files", f"train={good},validation={good}", "--steps", "1",
                  "--num-fewshot", "0", "--bootstrap-iters", "0", "--output", str(root / "earlier")])
    return {"root": root, "rm": os.path.join(ROOT, "models", "tess2-shakespeare-rm")}


def data(name, train="good.jsonl"):
    return ["--data-files", f"train={{root}}/{train},validation={{root}}/{name}"]


REFUSED = [  # (flags, a phrase of the message); {name} is a path of the `inputs` fixture
    (["--limit", "0"], "--limit must be a fraction in (0, 1) or a whole number of items >= 1, got 0"),
    (["--limit", "-1"], "--limit must be a fraction in (0, 1) or a whole number of items >= 1, got -1"),
    (["--limit", "2.5"], "--limit must be a fraction in (0, 1) or a whole number of items >= 1, got 2.5"),
    (["--mc-samples", "0"], "--mc-samples must be a positive integer, got 0"),
    (["--num-fewshot", "-1"], "--num-fewshot must be 0 or a positive integer, got -1"),
    (["--bootstrap-iters", "-1"], "--bootstrap-iters must be 0 or a positive integer, got -1"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--top-p", "0"], "--top-p must be a number in (0, 1], got 0"),
    (["--seed", "-1"], "--seed must be a whole number in [0, 2**63), got -1"),
    (["--eta", "nan"], "--eta must be a finite number >= 0, got nan"),
    (["--guidance-steps", "0"], "--guidance-steps must be a positive integer, got 0"),
    (["--total-length", "0"], "--total-length must be a positive integer, got 0"),
    (["--total-length", "5000"], "--total-length 5000 is longer than the 1024 positions the model reads"),
    (["--model", "{rm}"], "the model is a MistralForSequenceClassification, not a diffusion model"),
    (["--reward-model", SHIPPED], "the reward model must have a score head"),
    (["--eta", "1", "--reward-model", "{root}"], "has no config.json: not a Hugging Face checkpoint directory"),
    (["--device", "cpu:5"], "--device cpu:5: a CPU has no index: use cpu"),
    (["--tasks", "tess2_nope"], "unknown task(s) tess2_nope"),
    (["--tasks", "tess2_squad,tess2_triviaqa"], "--data-files applies to one task: pass a single --tasks name"),
    (["--data-files", "validation"], "--data-files wants SPLIT=PATH[,SPLIT=PATH...], got 'validation'"),
    (["--data-files", "validation={root}/good.jsonl"], "--data-files has no train=FILE: task tess2_triviaqa reads "
                                                       "its train split"),
    (data("absent.jsonl"), "--data-files validation={root}/absent.jsonl: no such file"),
    (data("notjson.jsonl"), "{root}/notjson.jsonl, line 3: not JSON (Expecting property name enclosed in double "
                            "quotes); --data-files takes JSONL (one JSON object a line) or a JSON list of objects"),
    (data("list.jsonl"), "{root}/list.jsonl, line 2: a list, not an object"),
    (data("numbers.json"), "{root}/numbers.json, item 1: a number, not an object"),
    (data("empty.jsonl"), "--data-files validation={root}/empty.jsonl holds no records"),
    (data("latin1.jsonl"), "--data-files validation={root}/latin1.jsonl is not UTF-8 text"),
    (data("kind.jsonl"), "{root}/kind.jsonl, line 2: field 'answer' is a string, where line 1 of {root}/good.jsonl "
                         "has an object: every record needs the fields of the first, each of the same kind"),
    (data("nested.jsonl"), "{root}/nested.jsonl, line 2: field 'answer.aliases' is a string, where line 1 of "
                           "{root}/good.jsonl has a list"),
    (data("missing.jsonl"), "{root}/missing.jsonl, line 2: no field 'answer', which line 1 of {root}/good.jsonl has"),
    (data("missing.jsonl", train="missing.jsonl"), "{root}/missing.jsonl, line 2: no field 'answer', which line 1 "
                                                   "has"),
    (data("good.jsonl", train="unread.jsonl"), "{root}/good.jsonl, line 1: field 'answer.value', which "
                                               "{root}/unread.jsonl lacks"),
    (data("unread.jsonl", train="unread.jsonl"), "{root}/unread.jsonl, line 1: task tess2_triviaqa cannot read it: "
                                                 "no field 'question'"),
    (data("novalue.jsonl", train="novalue.jsonl"), "{root}/novalue.jsonl, line 1: task tess2_triviaqa cannot read "
                                                   "it: it reads field 'value' of an object, which has none"),
    (data("nullalias.jsonl"), "{root}/nullalias.jsonl, line 2: task tess2_triviaqa cannot read it: TypeError: "
                              "'NoneType' object is not iterable"),
    (["--output", "{root}/file"], "--output {root}/file is a file: give a folder"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_a_refused_run_is_one_line_and_changes_no_output(flags, message, inputs, tmp_path, capsys, monkeypatch):
    ours_only = harness.task_manager
    monkeypatch.setattr(harness, "task_manager", lambda builtin=True: ours_only(builtin=False))  # skip lm-eval's index
    monkeypatch.setattr(harness.sample, "generate", lambda *a, **k: pytest.fail("a refused run sampled"))
    flags = [f.format(**inputs) for f in flags]
    outputs = [inputs["root"] / "file"] if "--output" in flags else \
        [tmp_path / "new", shutil.copytree(inputs["root"] / "earlier", tmp_path / "earlier")]
    good = inputs["root"] / "good.jsonl"
    for out in outputs:
        before = folder_hash(out)
        argv = ["--tasks", "tess2_triviaqa", "--data-files", f"train={good},validation={good}", "--steps", "1",
                "--num-fewshot", "0", "--bootstrap-iters", "0", "--output", str(out)]
        for flag in flags[::2]:
            argv = argv[:argv.index(flag)] + argv[argv.index(flag) + 2:] if flag in argv else argv
        with pytest.raises(SystemExit) as stop:
            run_cli(harness.main, "eval.harness", argv + flags)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith("eval.harness: error: ") and message.format(**inputs) in err, err
        assert folder_hash(out) == before


# -----------------------------------------------------------------------------
# Across processes: torchrun --nproc_per_node 2 gives the one-process run's results, each batch
# sampled once, by one process, with its own seeds

SPY = """
import json, os, runpy, sys
import sample
real = sample.generate
def spy(model, tok, prompts, **kw):  # records which process sampled which prompts with which seed
    with open(os.path.join(os.environ["SPY_DIR"], "rank" + os.environ.get("RANK", "0") + ".jsonl"), "a") as f:
        f.write(json.dumps({"prompts": list(prompts), "seed": kw.get("seed")}) + "\\n")
    return real(model, tok, prompts, **kw)
sample.generate = spy
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_spied(tmp_path, name, argv, processes):
    """`python spy.py -m MODULE ARGV` alone or under torch.distributed.run; {rank: [calls]}."""
    import subprocess
    import sys
    spy, calls = tmp_path / "spy.py", tmp_path / f"calls-{name}"
    spy.write_text(SPY)
    calls.mkdir()
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
                                 if processes > 1 else [])
    env = dict(os.environ, SPY_DIR=str(calls), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run(launch + [str(spy), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(calls.iterdir())}


def assert_spread(alone, together):
    """One process made every call; two made the same calls between them, each some, none twice."""
    calls = lambda ranks: sorted(json.dumps(c, sort_keys=True) for r in ranks.values() for c in r)  # noqa: E731
    assert list(alone) == ["rank0"] and sorted(together) == ["rank0", "rank1"]
    assert calls(together) == calls(alone) and all(together.values())


@pytest.mark.slow
def test_torchrun_intrinsic_gives_the_one_process_results(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": "x"}) + "\n" for p in (
        "Romans, countrymen, and lovers!", "To be, or not to be:", "Now is the winter", "Friends, Romans,",
        "O Romeo, Romeo!")))
    flags = ["--prompts", str(prompts), "--steps", "2", "--length", "4", "--batch-size", "2"]
    alone = run_spied(tmp_path, "alone", ["eval.intrinsic", *flags, "--output", str(tmp_path / "one")], 1)
    together = run_spied(tmp_path, "two", ["eval.intrinsic", *flags, "--output", str(tmp_path / "two")], 2)
    assert_spread(alone, together)
    assert [c["seed"] for c in alone["rank0"]] == [0, 2, 4]  # the batch at prompt j: seed + j
    for name in ("generations.jsonl", "metrics.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


@pytest.mark.slow
def test_torchrun_alpaca_gives_the_one_process_results(tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"instruction": i} for i in ("Write a line about the sea.", "Say hello.",
                                                                "Name a play by Shakespeare.")]))
    flags = ["--prompts", str(prompts), "--steps", "2", "--length", "4", "--batch-size", "1"]
    alone = run_spied(tmp_path, "alone", ["eval.alpaca", *flags, "--output", str(tmp_path / "one")], 1)
    together = run_spied(tmp_path, "two", ["eval.alpaca", *flags, "--output", str(tmp_path / "two")], 2)
    assert_spread(alone, together)
    one, two = (json.loads((tmp_path / d / "model_outputs.json").read_text()) for d in ("one", "two"))
    assert one == two and [o["instruction"] for o in one] == [i["instruction"] for i in json.loads(prompts.read_text())]


@pytest.mark.slow
def test_torchrun_harness_gives_the_one_process_results(tmp_path):
    docs = [{"question": f"Who says this in {play}? {line}", "question_id": str(j),
             "answer": {"aliases": [who], "value": who}}
            for j, (play, line, who) in enumerate([("Hamlet", "To be, or not to be", "Hamlet"),
                                                   ("Julius Caesar", "Friends, Romans, countrymen", "Antony"),
                                                   ("Macbeth", "Is this a dagger", "Macbeth")])]
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    flags = ["--tasks", "tess2_triviaqa", "--data-files", f"train={data},validation={data}", "--steps", "2",
             "--num-fewshot", "0", "--batch-size", "1", "--bootstrap-iters", "0"]
    alone = run_spied(tmp_path, "alone", ["eval.harness", *flags, "--output", str(tmp_path / "one")], 1)
    together = run_spied(tmp_path, "two", ["eval.harness", *flags, "--output", str(tmp_path / "two")], 2)
    assert_spread(alone, together)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["results"] == two["results"]
    name = "samples_tess2_triviaqa.jsonl"
    assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


LIKELIHOODS = """
import json, os, sys
import eval.harness as harness
from support.prompts import processes
real = harness.estimate_loglikelihood
def spy(model, context, continuation, *args):  # records which process estimated which pair
    with open(os.path.join(os.environ["SPY_DIR"], "rank" + os.environ.get("RANK", "0") + ".jsonl"), "a") as f:
        f.write(json.dumps({"context": context, "continuation": continuation}) + "\\n")
    return real(model, context, continuation, *args)
harness.estimate_loglikelihood = spy
class Request:
    def __init__(self, *args):
        self.args = args
lm = harness.TESS2(chat=False, mc_samples=2, progress_every=0)
pairs = [("To be, or not", " to be"), ("Friends,", " Romans"), ("Now is the", " winter"), ("O", " Romeo"),
         ("To be, or not", " to be")]
estimates = lm.loglikelihood([Request(*pair) for pair in pairs])
if processes()[0] == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(estimates, f)
"""


@pytest.mark.slow
def test_torchrun_likelihoods_are_the_one_process_estimates(tmp_path):
    """The loglikelihood requests (multiple choice) spread over two processes: each pair estimated
    once (the repeated one too), by one process, and every estimate the one-process run's."""
    import subprocess
    import sys
    (tmp_path / "likelihoods.py").write_text(LIKELIHOODS)
    found = {}
    for name, launch in (("one", [sys.executable]),
                         ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"])):
        (tmp_path / name).mkdir()
        env = dict(os.environ, SPY_DIR=str(tmp_path / name), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        run = subprocess.run(launch + [str(tmp_path / "likelihoods.py"), str(tmp_path / f"{name}.json")], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        found[name] = {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
                       for p in sorted((tmp_path / name).iterdir())}
    assert_spread(found["one"], found["two"])
    assert len(found["one"]["rank0"]) == 4  # 5 requests, one of them twice
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
