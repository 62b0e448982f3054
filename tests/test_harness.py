"""eval/harness.py and eval/tasks/: TESS 2 through lm-evaluation-harness, offline.

Each task runs end to end through lm-eval on a few items written here as JSONL. Where the answers
must be known, sample.generate is replaced by a stub that answers each prompt from a table (a
real model cannot be steered to a chosen text); it records what it was asked. The shipped
miniature model then runs one task through the whole harness for real.
"""
import json
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # requirements-eval.txt

import eval.harness as harness  # noqa: E402
import sample  # noqa: E402
from eval.tasks import paper  # noqa: E402
from model import Tokenizer, Transformer, preset  # noqa: E402

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
             "question": q, "answers": {"text": g, "answer_start": [0] * len(g)}} for j, (q, g, _, _) in enumerate(SQUAD)]
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
    cats, hello = "the cats sleep on the warm mat all day and dream of fish.", "hello there, my friend, how are you today?"
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
