"""
sample.py: the reverse process (SPEC 9), reward guidance (SPEC 10), infilling, batching, early exit
and the command line, on tiny random models written to temporary directories with a small
word-level tokenizer. Two hand-made stand-ins go through the same code: a "model" that always
predicts a fixed text and a reward model that likes one token.
"""
import html
import json
import os
import subprocess
import sys
import types
from html.parser import HTMLParser

import pytest
import torch
import torch.nn as nn

import data.chat
import sample
import tess2
from model import Tokenizer, Transformer, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a cat dog sat on mat sea sun and of to in is was it he she they we love write sonnet about".split()
VOCAB = ["<s>", "</s>", "[PAD]", "<unk>", "<|", "|>", "user", "assistant"] + WORDS + [f"w{i}" for i in range(40)]
V = len(VOCAB)


def write_checkpoint(path, seed=0, **overrides):
    """A tiny random diffusion model plus a word-level tokenizer (<s>, </s>, [PAD]) in one directory."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", timestep_embed=True, causal=False, vocab_size=V, **overrides)).init_weights()
    with torch.no_grad():
        model.timestep_embed.weight.normal_()  # so that time matters
    model.save_pretrained(str(path))
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "[PAD]"])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]"}, f)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(ckpt):
    return Transformer.from_pretrained(ckpt, verbose=False).eval()


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer(ckpt)


class FixedText(nn.Module):
    """Predicts `target` (a whole row) whatever it reads; with `before`, predicts that row instead
    while the time is above 0.5. Its hidden state at position j is the one-hot e_j and its LM head
    maps e_j to target[j + 1]: the AR convention (position j predicts the next token) that
    tess2.predict shifts so that logits[:, j] predicts token j."""

    def __init__(self, target, before=None):
        super().__init__()
        L = len(target)
        self.switch = before is not None
        self.args = preset("tiny", vocab_size=V, timestep_embed=True, causal=False)
        self.embed_tokens = nn.Embedding(V, 2 * L)
        self.lm_head = nn.Linear(2 * L, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            self.lm_head.weight[target[1:], torch.arange(L - 1)] = 10.0
            if before is not None:
                self.lm_head.weight[before[1:], L + torch.arange(L - 1)] = 10.0

    def forward(self, embeds, t=None, causal=None, hidden_only=False):
        B, L, _ = embeds.shape
        early = self.switch and float(t.max()) > 0.5
        h = torch.zeros(B, L, 2 * L)
        h[:, torch.arange(L), torch.arange(L) + L * early] = 1.0
        return h  # (B, L, D = 2L)


class LikesToken(nn.Module):
    """A reward model that likes token x: identity embeddings (it reads the probabilities
    themselves), reward = sum over positions of log p(x). Same interface as a score-head Transformer."""

    def __init__(self, x, vocab_size=V):
        super().__init__()
        self.x = x
        self.args = preset("tiny", vocab_size=vocab_size, head="score")
        self.embed_tokens = nn.Embedding(vocab_size, vocab_size)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.eye(vocab_size))

    def forward(self, embeds, causal=True):
        return torch.log(embeds[..., self.x] + 1e-6).sum(-1)  # (B,)


# -----------------------------------------------------------------------------
# The reverse process


def test_seeded_runs_are_reproducible_and_different_seeds_differ(model, tok):
    run = lambda seed: sample.generate(model, tok, ["write a sonnet about the sea"], steps=8, length=16, seed=seed,
                                       details=True)[0].tokens
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_one_argmax_step_is_the_models_argmax_on_the_starting_noise(model, tok):
    """N = 1: the only step is i = 0 (time 0, no noise added after it); the input is k * eps with
    eps = tess2.row_noise(seed) and the output is the argmax of that one prediction."""
    ids, span, ends = sample.make_batch(tok, ["the cat", "a dog sat"], length=8)
    tokens, steps_used, _ = sample.diffuse(model, ids, span, [5, 6], steps=1, top_p=None)
    S = tess2.SIMPLEX_VALUE * tess2.row_noise([5, 6], ids.shape[1], V)
    with torch.no_grad():
        logits = tess2.predict(model, ids, span, S, torch.zeros(2))
    assert torch.equal(tokens, torch.where(span, logits.argmax(-1), ids))
    assert steps_used.tolist() == [1, 1]
    again, _, _ = sample.diffuse(model, ids, span, [5, 6], steps=1, top_p=None)
    assert torch.equal(tokens, again)


def test_context_tokens_never_change(model, tok):
    ids, span, ends = sample.make_batch(tok, ["write a sonnet", "the cat sat on the mat and the dog"], length=10)
    tokens, _, (preds, conf) = sample.diffuse(model, ids, span, [0, 1], steps=6, record=True)
    assert torch.equal(tokens[~span], ids[~span])
    assert preds.shape == conf.shape == (6, *ids.shape)
    assert torch.equal(preds[:, ~span], ids[~span].expand(6, -1))  # at every step
    assert torch.all(conf[:, ~span] == 1.0) and torch.all(conf[:, span] < 1.0)
    assert (tokens[span] != ids[span]).any()  # the region was generated


def test_chat_prompts_are_stripped_and_templated_as_in_training(tok):
    ids, span = sample.encode_prompt(tok, "  write a sonnet \n")
    assert ids == sample.encode_prompt(tok, "write a sonnet")[0] == data.chat.encode_prompt(tok, "write a sonnet")
    assert ids == [tok.bos_id] + tok.encode("<|user|>\nwrite a sonnet\n<|assistant|>\n") and not any(span)
    assert sample.encode_prompt(tok, " the cat", chat=False)[0] == [tok.bos_id] + tok.encode(" the cat")


def test_infilling_generates_only_inside_the_gaps(model, tok):
    prompt = "the cat <mask:3> on the mat <mask:2> sea"
    ids, span, ends = sample.make_batch(tok, [prompt], chat=False)
    expected = [tok.bos_id] + tok.encode("the cat") + [tok.pad_id] * 3 + tok.encode("on the mat") + [tok.pad_id] * 2 \
        + tok.encode("sea")
    assert ids[0].tolist() == expected and ends == [len(expected)]  # no generation region: length 0 with gaps
    assert span[0].tolist() == [x == tok.pad_id for x in expected]
    tokens, _, _ = sample.diffuse(model, ids, span, [3], steps=6)
    assert torch.equal(tokens[~span], ids[~span])
    g = sample.generate(model, tok, [prompt], steps=6, seed=3, details=True)[0]
    assert len(g.tokens) == 5 and g.text.startswith("the cat ") and g.text.endswith(" sea")
    assert " on the mat " in g.text


def test_a_row_is_the_same_alone_and_in_a_batch(model, tok):
    prompts = ["write a sonnet about the sea and the sun", "the cat", "a dog sat on the mat"]
    kw = dict(steps=8, total_length=32, top_p=0.9, details=True)
    together = sample.generate(model, tok, prompts, seed=10, batch_size=3, **kw)
    for j, prompt in enumerate(prompts):
        alone = sample.generate(model, tok, [prompt], seed=10 + j, **kw)[0]
        assert alone.tokens == together[j].tokens and alone.text == together[j].text


def fixed_text_setup(tok):
    prompt = "write a sonnet"
    ids, span, ends = sample.make_batch(tok, [prompt], length=8)
    answer = tok.encode("the sea is love")
    row = ids[0].tolist()[:ends[0]] + answer + [tok.eos_id] + [tok.pad_id] * 3
    return prompt, FixedText(row), answer


def test_a_model_that_predicts_a_fixed_text_returns_exactly_that_text(tok):
    """Checks the label shift and the last step: the output is the final argmax, cut at EOS."""
    prompt, fixed, answer = fixed_text_setup(tok)
    g = sample.generate(fixed, tok, [prompt], steps=10, length=8, top_p=None, details=True)[0]
    assert g.tokens == answer and g.text == "the sea is love"
    assert sample.generate(fixed, tok, prompt, steps=10, length=8) == ["the sea is love"]  # nucleus too: p ~ 1


def test_early_exit_stops_a_converged_run_without_changing_its_text(tok):
    prompt, fixed, answer = fixed_text_setup(tok)
    g = sample.generate(fixed, tok, [prompt], steps=20, length=8, top_p=None, early_exit=3, details=True)[0]
    assert g.text == "the sea is love" and g.steps_used == 4  # stable for 3 steps after the first


def test_early_exit_waits_for_a_late_change(tok):
    """A model that says one text for t > 0.5 and another after: with N = 10 the first holds for
    4 steps (t = 0.9 .. 0.6), so early_exit=4 must not fire before the change at step 5; it fires
    4 steps later, with the text the full run ends with."""
    prompt, fixed, answer = fixed_text_setup(tok)
    row = sample.make_batch(tok, [prompt], length=8)[0][0].tolist()
    end = len(row) - 8
    before = row[:end] + tok.encode("a cat") + [tok.eos_id] + [tok.pad_id] * 5
    target = row[:end] + answer + [tok.eos_id] + [tok.pad_id] * 3
    late = FixedText(target, before)
    full = sample.generate(late, tok, [prompt], steps=10, length=8, top_p=None, details=True)[0]
    g = sample.generate(late, tok, [prompt], steps=10, length=8, top_p=None, early_exit=4, details=True)[0]
    assert full.text == g.text == "the sea is love" and (full.steps_used, g.steps_used) == (10, 9)
    g = sample.generate(late, tok, [prompt], steps=10, length=8, top_p=None, early_exit=3, details=True)[0]
    assert g.text == "a cat" and g.steps_used == 4  # too eager: it stops on the early text


# -----------------------------------------------------------------------------
# Reward guidance


def test_reward_guidance_raises_the_reward_of_the_soft_text(model, tok):
    """One diffusion step's guidance with a real (random) score-head model: the reward of the
    soft input rises for a small eta, and context positions are left alone."""
    torch.manual_seed(1)
    rm = Transformer(preset("tiny", head="score", vocab_size=V)).init_weights().eval()
    ids, span, _ = sample.make_batch(tok, ["the cat", "write a sonnet about"], length=6)
    logits = torch.randn(*ids.shape, V)

    def reward(x):
        p = torch.softmax(x, -1)
        return rm(embeds=torch.where(span[..., None], p @ rm.embed_tokens.weight, rm.embed_tokens(ids)), causal=True)

    guided = sample.reward_guidance(rm, logits.clone(), ids, span, eta=0.5, steps=5)
    assert torch.all(reward(guided) > reward(logits))
    assert torch.equal(guided[~span], logits[~span])


def test_reward_guidance_makes_the_liked_token_more_frequent(model, tok):
    liked = tok.encode("sea")[0]
    rm = LikesToken(liked)
    freq, rewards = [], []
    for eta in (0.0, 0.2, 1.0, 2.0):  # default 5 guidance steps per diffusion step
        gens = sample.generate(model, tok, ["the cat", "a dog"], steps=6, length=16, seed=0, reward_model=rm, eta=eta,
                               details=True)
        tokens = [x for g in gens for x in g.tokens]
        freq.append(tokens.count(liked) / len(tokens))
        ids, span, _ = sample.make_batch(tok, [g.text for g in gens], length=0, total_length=20, chat=False)
        rewards.append(rm(embeds=rm.embed_tokens(ids)).mean().item())
    assert freq == sorted(freq) and freq[-1] > 0.5 > freq[0]
    assert rewards == sorted(rewards) and rewards[-1] > rewards[0]


def test_reward_guidance_needs_a_reward_model_with_the_same_tokenizer(model, tok):
    with pytest.raises(ValueError, match="reward model"):
        sample.generate(model, tok, ["the cat"], steps=2, length=4, eta=0.25)
    with pytest.raises(ValueError, match="vocabulary"):
        sample.generate(model, tok, ["the cat"], steps=2, length=4, reward_model=LikesToken(5, vocab_size=V + 1))
    other = types.SimpleNamespace(fingerprint=lambda: {**tok.fingerprint(), "eos_id": 7})
    with pytest.raises(ValueError, match="tokenizers differ"):
        sample.generate(model, tok, ["the cat"], steps=2, length=4, reward_model=LikesToken(5), reward_tokenizer=other)


# -----------------------------------------------------------------------------
# Bad input and the command line


def test_bad_input_is_refused_with_what_to_do(model, tok):
    with pytest.raises(ValueError, match="steps"):
        sample.generate(model, tok, ["the cat"], steps=0)
    with pytest.raises(ValueError, match="at most 1024"):
        sample.generate(model, tok, [" ".join(["cat"] * 1100)], steps=2, length=4)
    with pytest.raises(ValueError, match="--length"):
        sample.generate(model, tok, ["the cat"], steps=2, length=0)
    with pytest.raises(ValueError, match="total-length"):
        sample.generate(model, tok, ["the cat sat on the mat"], steps=2, length=8, total_length=10)


def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_refuses_bad_flags_before_any_work(ckpt, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sample, "DEFAULT_MODEL", str(tmp_path / "no-model"))  # whether or not the repo ships one
    monkeypatch.setattr(sample, "DEFAULT_REWARD_MODEL", str(tmp_path / "no-rm"))
    assert "pass --model" in cli_error(["--prompt", "hi"], capsys)
    assert "--steps must be at least 1" in cli_error(["--model", ckpt, "--prompt", "hi", "--steps", "0"], capsys)
    assert "--top-p must be in (0, 1]" in cli_error(["--model", ckpt, "--prompt", "hi", "--top-p", "0"], capsys)
    # --eta alone guides with the default reward model: refused when that is missing
    assert "pass --reward-model" in cli_error(["--model", ckpt, "--prompt", "hi", "--eta", "0.25"], capsys)
    assert "no prompt" in cli_error(["--model", ckpt], capsys)
    assert "leaves nothing to generate" in cli_error(["--model", ckpt, "--prompt", "hi", "--length", "0"], capsys)


def test_cli_finds_the_default_model_next_to_sample_py_from_any_directory(ckpt, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sample, "HERE", os.path.dirname(ckpt))
    monkeypatch.setattr(sample, "DEFAULT_MODEL", os.path.basename(ckpt))  # relative, like models/tess2-shakespeare
    monkeypatch.chdir(tmp_path)
    gens = sample.main(["--prompt", "the cat", "--steps", "2", "--length", "3"])
    assert capsys.readouterr().out == gens[0].text + "\n"


def test_cli_prints_text_and_shows_progress(ckpt, capsys):
    gens = sample.main(["--model", ckpt, "--prompt", "the cat", "--steps", "3", "--length", "5", "--argmax",
                        "--show", "--early-exit", "2"])
    out, err = capsys.readouterr()
    assert out == gens[0].text + "\n"
    assert "[step 3/3" in err  # stderr is not a terminal here: plain redraws, no escape codes
    assert "\x1b[" not in err


class Balanced(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def test_cli_end_to_end_with_json_and_html(ckpt, tmp_path):
    page = tmp_path / "steps.html"
    cmd = [sys.executable, "sample.py", "--model", ckpt, "--prompt", "write a sonnet <about> & the sea",
           "--prompt", "the cat <mask:2> on the mat", "--steps", "4", "--length", "6", "--seed", "3", "--json",
           "--html", str(page)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["write a sonnet <about> & the sea", "the cat <mask:2> on the mat"]
    for r in rows:
        assert set(r) == {"prompt", "text", "tokens", "steps_used", "seconds"} and r["steps_used"] == 4
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    parser = Balanced()
    parser.feed(text)
    parser.close()
    assert parser.stack == ["html"] or parser.stack == []
    assert html.escape(rows[0]["text"]) in text and "&lt;about&gt; &amp; the sea" in text
    assert rows[0]["text"] in "".join(parser.text)
