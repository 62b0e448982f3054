"""The evaluation metrics against values worked out by hand; eval.miniature's refusals."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from eval.metrics import distinct_n, mean_reward, perplexity, unigram_entropy
from model import Transformer, preset
from support.cli import run_cli
from conftest import folder_hash  # noqa: E402


def test_distinct_n_counts_unique_ngrams_over_all_texts():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique of 7; bigrams: ab ba ab | ab bc -> {ab, ba, bc} 3 of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 4) == pytest.approx(1 / 1)  # only "a b a b"
    assert distinct_n(["a"], 2) == 0.0


def test_unigram_entropy_in_nats():
    assert unigram_entropy(["x x x x"]) == 0.0
    assert unigram_entropy(["a b", "c d"]) == pytest.approx(math.log(4))
    # p = (1/2, 1/4, 1/4)
    assert unigram_entropy(["a a b c"]) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def tiny(head="lm"):
    torch.manual_seed(0)
    return Transformer(preset("tiny", head=head)).init_weights().eval()


def test_perplexity_is_exp_mean_nll_of_continuations_only():
    model = tiny()
    prompts, conts = [[1, 5, 6], [1, 9]], [[7, 8], [10, 11, 12]]
    nll, n = 0.0, 0
    for p, c in zip(prompts, conts):  # one row at a time, no padding: the reference
        ids = torch.tensor([p + c])
        logp = F.log_softmax(model(ids, causal=True)[0].float(), -1)
        for j, tok in enumerate(c):
            nll -= logp[len(p) - 1 + j, tok].item()
            n += 1
    assert perplexity(model, prompts, conts, batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-5)
    # batching (and so padding) does not change it
    assert perplexity(model, prompts, conts, batch_size=1) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_perplexity_refuses_mismatched_or_empty_input():
    model = tiny()
    with pytest.raises(ValueError, match="continuations"):
        perplexity(model, [[1]], [])
    with pytest.raises(ValueError, match="no continuation"):
        perplexity(model, [[1]], [[]])


def test_mean_reward_reads_each_sequence_at_its_last_real_token():
    rm = tiny("score")
    seqs = [[1, 5, 6, 2], [1, 9, 2]]
    alone = [rm(torch.tensor([s]), causal=True).item() for s in seqs]
    assert mean_reward(rm, seqs, pad_id=0, batch_size=2) == pytest.approx(sum(alone) / 2, rel=1e-5)


def test_mean_reward_is_over_sequences_whatever_the_batch_size():
    """3 sequences in batches of 2 (a full one and a last one of 1): the mean of the 3 rewards."""
    rm = tiny("score")
    seqs = [[1, 5, 6, 2], [1, 9, 2], [1, 7, 8, 9, 10, 2]]
    alone = [rm(torch.tensor([s]), causal=True).item() for s in seqs]
    for batch_size in (1, 2, 5):
        assert mean_reward(rm, seqs, pad_id=0, batch_size=batch_size) == pytest.approx(sum(alone) / 3, rel=1e-5)


# -----------------------------------------------------------------------------
# eval.miniature: refused runs are one line, exit status 2, and change no output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "models", "tess2-shakespeare")
SHIPPED_RM = os.path.join(ROOT, "models", "tess2-shakespeare-rm")


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """A miniature's folder (held-out chats, an earlier run's results), one without "continue" chats,
    and a small causal scorer with the shipped tokenizer."""
    root = tmp_path_factory.mktemp("miniature")
    chats = [{"task": "continue", "user": "Continue this speech by ROMEO from Romeo and Juliet:\nBut soft!",
              "assistant": "What light through yonder window breaks?"},
             {"task": "who", "user": "Who says this in Hamlet?\nTo be, or not to be", "assistant": "Hamlet"}]
    for name, kept in (("out", chats), ("nocontinue", chats[1:])):
        (root / name / "data").mkdir(parents=True)
        (root / name / "data" / "sft_val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in kept))
    for name in ("results.json", "results.md", "settling.html"):
        (root / "out" / name).write_text(f"an earlier {name}")
    torch.manual_seed(0)
    scorer = Transformer(preset("tiny", vocab_size=4096, sliding_window=None)).init_weights()
    scorer.save_pretrained(str(root / "scorer"), tokenizer_from=SHIPPED)
    return root


MINIATURE_REFUSED = [  # (flags, a phrase of the message); {root} is the fixture's folder
    (["--prompts", "0"], "--prompts must be a positive integer, got 0"),
    (["--who", "-1"], "--who must be 0 or a positive integer, got -1"),
    (["--length", "0"], "--length must be a positive integer, got 0"),
    (["--steps", "5", "0"], "--steps must be a positive integer, got 0"),
    (["--etas", "0", "-1"], "--etas must be a finite number >= 0, got -1"),
    (["--eta-steps", "0"], "--eta-steps must be a positive integer, got 0"),
    (["--ship", "{root}/ship"], "--ship writes the diffusion model and the reward model: pass --rm"),
    (["--sft", SHIPPED_RM], "the model is a MistralForSequenceClassification, not a diffusion model"),
    (["--rm", SHIPPED], "the reward model must have a score head"),
    (["--scorer", SHIPPED], f"--scorer {SHIPPED} is a MistralForDiffusionLM: perplexity is measured under a causal"),
    (["--out", "{root}/nocontinue"], "sft_val.jsonl holds no \"continue\" chat to measure"),
    (["--out", "{root}/scorer"], "sft_val.jsonl does not exist: prepare the data first"),
]


@pytest.mark.parametrize("flags, message", MINIATURE_REFUSED, ids=[" ".join(f) for f, _ in MINIATURE_REFUSED])
def test_a_refused_miniature_is_one_line_and_changes_no_output(flags, message, miniature, capsys, monkeypatch):
    import eval.miniature
    monkeypatch.setattr(eval.miniature, "generate", lambda *a, **k: pytest.fail("a refused run sampled"))
    flags = [f.format(root=miniature) for f in flags]
    before = folder_hash(miniature)
    argv = ["--out", str(miniature / "out"), "--sft", SHIPPED, "--scorer", str(miniature / "scorer")]
    for flag in (f for f in flags if f.startswith("--")):
        argv = argv[:argv.index(flag)] + argv[argv.index(flag) + 2:] if flag in argv else argv
    with pytest.raises(SystemExit) as stop:
        run_cli(eval.miniature.main, "eval.miniature", argv + flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("eval.miniature: error: ") and message.format(root=miniature) in err, err
    assert folder_hash(miniature) == before
