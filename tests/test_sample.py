"""
sample.py: the reverse process (METHOD.md §9) as a state and one step (rows leaving and joining
between steps), reward guidance (§10) and its memory, generation settings, infilling, batching,
early exit, --compile and the command line, on tiny random models written to temporary
directories with a small word-level tokenizer. Two hand-made stand-ins go through the same code:
a "model" that always predicts a fixed text and a reward model that likes one token.
"""
import html
import json
import os
import re
import math
import subprocess
import sys
import types
from html.parser import HTMLParser

import pytest
import torch
import torch.nn as nn

import sample
import tess2
from conftest import word_tokenizer
from model import Transformer, preset
from support import fused_sampling
from support import prompts as prompting
from support.hub import read_json
from support.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a cat dog sat on mat sea sun and of to in is was it he she they we love write sonnet about".split()
VOCAB = ["<s>", "</s>", "[PAD]", "<unk>", "<|", "|>", "user", "assistant"] + WORDS + [f"w{i}" for i in range(40)]
V = len(VOCAB)


def write_checkpoint(path, seed=0, **overrides):
    """A tiny random diffusion model plus a word-level tokenizer (<s>, </s>, [PAD]) in one directory."""
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", timestep_embed=True, causal=False, vocab_size=V, **overrides)).init_weights()
    with torch.no_grad():
        model.timestep_embed.weight.normal_()  # so that time matters
    model.save_pretrained(str(path))
    return word_tokenizer(path, VOCAB, config={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]"})


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
    while the time is above 0.5; with `second`, gives that row's tokens a logit 1 below target's
    (p ~ 0.27 each: nucleus samples differ from the argmax). Its hidden state at position j is the
    one-hot e_j and its LM head maps e_j to target[j + 1]: the AR convention (position j predicts
    the next token) that tess2.predict shifts so that logits[:, j] predicts token j."""

    def __init__(self, target, before=None, second=None):
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
            if second is not None:
                self.lm_head.weight[second[1:], torch.arange(L - 1)] = 9.0

    def hidden_states(self, embeds, t=None, key_padding_mask=None):
        B, L, _ = embeds.shape  # L: the target's length, or less for a row that has shed its tail
        early, D = self.switch and float(t.max()) > 0.5, self.lm_head.in_features
        h = torch.zeros(B, L, D)
        h[:, torch.arange(L), torch.arange(L) + D // 2 * early] = 1.0
        return h  # (B, L, D = 2 x the target's length)


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

    def forward(self, embeds, causal=True, key_padding_mask=None, last_index=None):
        return torch.log(embeds[..., self.x] + 1e-6).sum(-1)  # (B,)


# -----------------------------------------------------------------------------
# The reverse process


def settings(**kw):
    return prompting.Settings(**{"total_length": None, **kw}).check()


def batch(tok, prompts, **kw):
    return prompting.make_batch(tok, prompts, settings(**kw), 1024, tok.pad_id)


def test_seeded_runs_are_reproducible_and_different_seeds_differ(model, tok):
    run = lambda seed: sample.generate(model, tok, ["write a sonnet about the sea"], steps=8, length=16, seed=seed,
                                       details=True)[0].tokens
    assert run(1) == run(1)
    assert run(1) != run(2)


def alpha_bar_formula(s):
    f = lambda x: math.cos((x + 1e-4) / (1 + 1e-4) * math.pi / 2) ** 2
    return f(s) / f(0.0)


def reverse_process_by_hand(model, ids, span, seed, N, top_p, ddim=False):
    """§9 written out for one row, nothing from sample.py: S = k eps; for i = N-1..0: logits =
    predict(S, i/N, previous logits); S_hat from the projection (argmax or nucleus, drawn from the
    row's generator); S = sqrt(ab(i-1)) S_hat + sqrt(1 - ab(i-1)) k eps'. Output: argmax of the last
    logits on the span. Noise exists only where the model reads S, the span positions: the generator
    draws the first eps for them (n_span, V), then per step the nucleus, then eps' for them; S at
    context positions is never read (predict takes the clean tokens there) and is left 0.
    ddim: eps' is not drawn but implied (Eq. D1): eps' = (S - sqrt(ab(i)) S_hat) / (sqrt(1 - ab(i)) k),
    with ab = 0 at the first step (S = k eps was made at pure noise)."""
    g = torch.Generator().manual_seed(seed)
    K, V = tess2.SIMPLEX_VALUE, model.args.vocab_size
    n = int(span.sum())
    S = torch.zeros(1, ids.shape[1], V)
    S[span] = K * torch.empty(n, V).normal_(generator=g)  # (1, L, V)
    prev = None
    for i in range(N - 1, -1, -1):
        with torch.no_grad():
            logits = tess2.predict(model, ids, span, S, torch.tensor([i / N]), prev)
        prev = logits
        if i == 0:
            break
        if top_p is None:
            proj = logits.argmax(-1)
        else:
            proj = ids.clone()
            proj[span] = tess2.project(logits[span][None], top_p, g)[0]
        a = alpha_bar_formula((i - 1) / N)
        S_hat = 2 * K * torch.nn.functional.one_hot(proj[span], V).float() - K  # (n, V)
        if ddim:
            a_now = 0.0 if i == N - 1 else alpha_bar_formula(i / N)
            eps = (S[span] - math.sqrt(a_now) * S_hat) / (math.sqrt(1 - a_now) * K)
        else:
            eps = torch.empty(n, V).normal_(generator=g)
        S = torch.zeros(1, ids.shape[1], V)
        S[span] = math.sqrt(a) * S_hat + math.sqrt(1 - a) * K * eps
    return torch.where(span, logits.argmax(-1), ids)


@pytest.fixture(scope="module")
def sharp():
    """A tiny random model with large weights, whose predictions depend strongly on its inputs."""
    torch.manual_seed(3)
    m = Transformer(preset("tiny", timestep_embed=True, causal=False, vocab_size=V)).init_weights(std=0.3)
    with torch.no_grad():
        m.timestep_embed.weight.normal_()
    return m.eval()


@pytest.mark.parametrize("top_p", [None, 0.6])
def test_the_reverse_process_is_the_one_written_out(sharp, tok, top_p):
    """Catches re-noising with alpha_bar_i instead of alpha_bar_{i-1}, re-noising from the argmax instead
    of the projection, and sampling without self-conditioning: each changes the tokens here."""
    model = sharp
    b = batch(tok, ["the cat", "write a sonnet about the sea"], length=10)
    tokens, steps_used = sample.diffuse(model, b.ids, b.span_mask, [11, 12], steps=6, top_p=top_p, lengths=b.lengths)
    assert steps_used.tolist() == [6, 6]
    for r in range(2):
        n = b.lengths[r]
        expected = reverse_process_by_hand(model, b.ids[r:r + 1, :n], b.span_mask[r:r + 1, :n], 11 + r, 6, top_p)
        assert torch.equal(tokens[r, :n], expected[0]), r


def test_each_check_of_the_written_out_process_has_power(sharp, tok, monkeypatch):
    """The same comparison fails when the sampler is broken in each of the three ways."""
    model = sharp
    b = batch(tok, ["write a sonnet about the sea"], length=12)
    ids, span = b.ids, b.span_mask
    expected = reverse_process_by_hand(model, ids, span, 3, 6, 0.6)
    run = lambda: sample.diffuse(model, ids, span, [3], steps=6, top_p=0.6)[0]  # noqa: E731
    assert torch.equal(run(), expected)
    real_predict, real_alpha_bars = tess2.predict, tess2.alpha_bars
    with monkeypatch.context() as mp:  # no self-conditioning
        mp.setattr(tess2, "predict", lambda m, i, s, S, t, prev=None, **kw: real_predict(m, i, s, S, t, None, **kw))
        assert not torch.equal(run(), expected)
    with monkeypatch.context() as mp:  # alpha_bars[i - 1] now holds alpha_bar(i / N)
        mp.setattr(tess2, "alpha_bars", lambda N: torch.cat([real_alpha_bars(N)[1:], torch.zeros(1)]))
        assert not torch.equal(run(), expected)
    with monkeypatch.context() as mp:  # re-noise from the argmax
        mp.setattr(fused_sampling, "project_spans", lambda logits, best, where, top_p, g, draws: logits.argmax(-1))
        assert not torch.equal(run(), expected)


@pytest.mark.parametrize("top_p", [None, 0.6])
def test_the_deterministic_sampler_is_the_one_written_out(sharp, tok, top_p):
    """sampler="ddim": the written-out loop with the implied noise, for rows of two lengths and an
    infilling row. Catches fresh noise, the implied noise taken as if S were pure noise at every step,
    and, at the first step, at alpha_bar_{N-1} instead of 0: each changes the tokens here."""
    b = batch(tok, ["the cat", "write a sonnet about the sea"], length=10)
    tokens, _ = sample.diffuse(sharp, b.ids, b.span_mask, [11, 12], steps=6, top_p=top_p, lengths=b.lengths,
                               sampler="ddim")
    for r in range(2):
        n = b.lengths[r]
        expected = reverse_process_by_hand(sharp, b.ids[r:r + 1, :n], b.span_mask[r:r + 1, :n], 11 + r, 6, top_p,
                                           ddim=True)
        assert torch.equal(tokens[r, :n], expected[0]), r
        assert not torch.equal(expected[0], reverse_process_by_hand(sharp, b.ids[r:r + 1, :n],
                                                                    b.span_mask[r:r + 1, :n], 11 + r, 6, top_p))
    gaps = batch(tok, ["the cat <mask:3> on the mat <mask:2> sea"], chat=False)
    tokens, _ = sample.diffuse(sharp, gaps.ids, gaps.span_mask, [4], steps=6, top_p=top_p, sampler="ddim")
    assert torch.equal(tokens, reverse_process_by_hand(sharp, gaps.ids, gaps.span_mask, 4, 6, top_p, ddim=True))
    real, first = fused_sampling.renoise_ddim_spans_, float(tess2.alpha_bars(6)[5])
    for wrong in (lambda S, x, now, then, *a: real(S, x, [0.0] * len(now), then, *a),  # as if S were pure noise
                  lambda S, x, now, then, *a: real(S, x, [first if v == 0 else v for v in now], then, *a)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused_sampling, "renoise_ddim_spans_", wrong)
            tokens, _ = sample.diffuse(sharp, b.ids[:1], b.span_mask[:1], [11], steps=6, top_p=top_p, sampler="ddim")
        assert not torch.equal(tokens[0, :b.lengths[0]], reverse_process_by_hand(
            sharp, b.ids[:1, :b.lengths[0]], b.span_mask[:1, :b.lengths[0]], 11, 6, top_p, ddim=True)[0])


def test_the_deterministic_sampler_draws_its_noise_once(sharp, tok):
    """With argmax the generator is never drawn from after `start` (its k eps); with nucleus only the
    projection's uniforms are, one per span position and step: the generator after each step is a
    fresh one that drew (n_span, V) normals and then n_span uniforms per step before."""
    b = batch(tok, ["write a sonnet about the sea"], length=9)
    n = int(b.span_mask.sum())
    for top_p in (None, 0.6):
        state = sample.start(b.ids, b.span_mask, [5], V, steps=6, top_p=top_p, sampler="ddim")
        g = torch.Generator().manual_seed(5)
        torch.empty(n, V).normal_(generator=g)
        assert torch.equal(state.generators[0].get_state(), g.get_state())
        while state.keys:
            sample.step(sharp, state)
            if state.keys and top_p is not None:
                torch.rand(n, generator=g)
            if state.keys:
                assert torch.equal(state.generators[0].get_state(), g.get_state()), top_p


@pytest.mark.parametrize("options", [dict(sampler="ddim"), dict(shed=2), dict(sampler="ddim", shed=1)])
def test_the_same_seed_gives_the_same_text_with_either_sampler_and_shedding(sharp, tok, options):
    b = batch(tok, ["the cat", "write a sonnet about the sea"], length=10)
    run = lambda seeds: sample.diffuse(sharp, b.ids, b.span_mask, seeds, steps=6, lengths=b.lengths,  # noqa: E731
                                       pad_id=tok.pad_id, **options)[0]
    assert torch.equal(run([1, 2]), run([1, 2]))
    assert not torch.equal(run([1, 2]), run([3, 4]))


def test_the_output_is_the_argmax_of_the_final_logits_not_the_last_nucleus_sample(tok):
    """A model whose last logits put ~0.27 on a second text: nucleus samples often pick it, the
    output never does (the released code returns the argmax of the final guided logits)."""
    prompt, fixed, answer = fixed_text_setup(tok)
    b = batch(tok, [prompt], length=8)
    other = b.ids[0].tolist()[:b.ends[0]] + tok.encode("a dog sat on") + [tok.eos_id] + [tok.pad_id] * 3
    two = FixedText(fixed.target, second=other)
    for seed in range(5):
        g = sample.generate(two, tok, [prompt], steps=4, length=8, top_p=0.99, seed=seed, details=True)[0]
        assert g.tokens == answer
    logits = tess2.predict(two, b.ids, b.span_mask, torch.zeros(1, b.ids.shape[1], V), torch.zeros(1))
    sampled = fused_sampling.project_spans(logits, b.ids, fused_sampling.span_positions(b.span_mask), [0.99],
                                           tess2.row_generators([0]))
    assert (sampled[b.span_mask] != torch.tensor(other)[b.span_mask[0]]).any()  # the sampler does pick both


def test_the_argmax_at_span_positions_and_a_rows_text_are_their_definitions():
    """fused_sampling.span_argmax is torch.where(span_mask, argmax, ids) (one run, gaps, no span);
    fused_sampling.row_tokens is a row's argmax over its length, then its shed tail."""
    torch.manual_seed(0)
    span = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    ids, logits = torch.randint(0, V, (3, 5)), torch.randn(3, 5, V)
    best = fused_sampling.span_argmax(logits, ids, fused_sampling.span_positions(span))
    assert torch.equal(best, torch.where(span, logits.argmax(-1), ids))
    state = types.SimpleNamespace(best=best, lengths=[5, 3, 2], tails=[ids.new_zeros(0), ids[1, :2], ids[2, :1]])
    assert fused_sampling.row_tokens(state, 1).tolist() == best[1, :3].tolist() + ids[1, :2].tolist()
    assert fused_sampling.row_tokens(state, 0).tolist() == best[0].tolist()

def test_context_tokens_never_change(model, tok):
    gens = sample.generate(model, tok, ["write a sonnet", "the cat sat on the mat and the dog"], steps=6, length=10,
                           record=True)
    for g, prompt in zip(gens, ["write a sonnet", "the cat sat on the mat and the dog"]):
        ids, _ = prompting.encode_prompt(tok, prompt)
        n = len(ids)
        assert g.predictions.shape == g.confidence.shape == (6, n + 10)
        assert torch.equal(g.predictions[:, :n], torch.tensor(ids).expand(6, -1))  # at every step
        assert torch.all(g.confidence[:, :n] == 1.0) and torch.all(g.confidence[:, n:] < 1.0)


def test_infilling_generates_only_inside_the_gaps(model, tok):
    prompt = "the cat <mask:3> on the mat <mask:2> sea"
    b = batch(tok, [prompt], chat=False)
    expected = [tok.bos_id] + tok.encode("the cat") + [tok.pad_id] * 3 + tok.encode("on the mat") + [tok.pad_id] * 2 \
        + tok.encode("sea")
    assert b.ids[0].tolist() == expected and b.ends == b.lengths == [len(expected)]  # no region after the prompt
    assert b.span_mask[0].tolist() == [x == tok.pad_id for x in expected]
    tokens, _ = sample.diffuse(model, b.ids, b.span_mask, [3], steps=6)
    assert torch.equal(tokens[~b.span_mask], b.ids[~b.span_mask])
    g = sample.generate(model, tok, [prompt], steps=6, seed=3, chat=False, details=True)[0]
    assert len(g.tokens) == 5 and g.text.startswith("the cat ") and g.text.endswith(" sea")
    assert " on the mat " in g.text


@pytest.mark.parametrize("batch_size", [2, 8])
def test_a_row_is_the_same_alone_and_in_a_batch_of_any_size(model, tok, batch_size):
    """Rows of different lengths (prompt + --length) share a batch: each is masked to its own
    length, so prompt j gives, with seed + j, the text it gives alone, across batch boundaries too."""
    prompts = ["write a sonnet about the sea and the sun", "the cat", "a dog sat on the mat", "we love it",
               "she was in the sea", "the sun", "it is", "they sat on a mat and wrote a sonnet", "he"]
    kw = dict(steps=6, length=7, top_p=0.9, details=True, seed=10)
    together = sample.generate(model, tok, prompts, batch_size=batch_size, **kw)
    for j, prompt in enumerate(prompts):
        alone = sample.generate(model, tok, [prompt], **{**kw, "seed": 10 + j})[0]
        assert alone.tokens == together[j].tokens, j
    assert len({tuple(g.tokens) for g in together}) > 1


def fixed_text_setup(tok):
    prompt = "write a sonnet"
    b = batch(tok, [prompt], length=8)
    answer = tok.encode("the sea is love")
    row = b.ids[0].tolist()[:b.ends[0]] + answer + [tok.eos_id] + [tok.pad_id] * 3
    fixed = FixedText(row)
    fixed.target = row
    return prompt, fixed, answer


def test_a_model_that_predicts_a_fixed_text_returns_exactly_that_text(tok):
    """Checks the label shift and the last step: the output is the final argmax, cut at EOS."""
    prompt, fixed, answer = fixed_text_setup(tok)
    g = sample.generate(fixed, tok, [prompt], steps=10, length=8, top_p=None, details=True)[0]
    assert g.tokens == answer and g.text == "the sea is love"
    assert sample.generate(fixed, tok, prompt, steps=10, length=8) == ["the sea is love"]  # nucleus too: p ~ 1


def test_text_after_the_first_eos_never_reaches_the_output(tok):
    prompt = "write a sonnet"
    b = batch(tok, [prompt], length=10)
    row = b.ids[0].tolist()[:b.ends[0]] + tok.encode("the sun") + [tok.eos_id] + tok.encode("a dog sat") \
        + [tok.eos_id] + tok.encode("it is") + [tok.pad_id]
    assert len(row) == b.lengths[0]
    g = sample.generate(FixedText(row), tok, [prompt], steps=3, length=10, top_p=None, details=True)[0]
    assert g.text == "the sun" and g.tokens == tok.encode("the sun")


def test_early_exit_stops_a_converged_run_without_changing_its_text(tok):
    prompt, fixed, answer = fixed_text_setup(tok)
    g = sample.generate(fixed, tok, [prompt], steps=20, length=8, top_p=None, early_exit=3, details=True)[0]
    assert g.text == "the sea is love" and g.steps_used == 10  # stable from the start, but not before half


def test_early_exit_waits_for_a_late_change(tok):
    """A model that says one text for t > 0.5 and another after: with N = 10 the first holds for
    4 steps (t = 0.9 .. 0.6), so early_exit=4 must not fire before the change at step 5; it fires
    4 steps later, with the text the full run ends with."""
    prompt, fixed, answer = fixed_text_setup(tok)
    row = batch(tok, [prompt], length=8).ids[0].tolist()
    end = len(row) - 8
    before = row[:end] + tok.encode("a cat") + [tok.eos_id] + [tok.pad_id] * 5
    target = row[:end] + answer + [tok.eos_id] + [tok.pad_id] * 3
    late = FixedText(target, before)
    full = sample.generate(late, tok, [prompt], steps=10, length=8, top_p=None, details=True)[0]
    g = sample.generate(late, tok, [prompt], steps=10, length=8, top_p=None, early_exit=4, details=True)[0]
    assert full.text == g.text == "the sea is love" and (full.steps_used, g.steps_used) == (10, 9)
    g = sample.generate(late, tok, [prompt], steps=10, length=8, top_p=None, early_exit=3, details=True)[0]
    assert g.text == "the sea is love" and g.steps_used == 8  # not before half the steps: not on the early text


def test_rows_that_exit_leave_the_batch_and_the_others_go_on_unchanged(sharp, tok, monkeypatch):
    """Short gaps settle early, a long region does not: the settled rows leave the batch (no more
    model passes for them) and the remaining rows compute exactly what they compute in a full run."""
    prompts = ["the cat sat on the <mask:1> mat", "the cat", "a dog <mask:1> on the mat", "we love it"]
    sizes = []

    real = tess2.predict

    def counting(m, ids, span, S, t, prev=None, **kw):
        sizes.append(S.shape[0])
        return real(m, ids, span, S, t, prev, **kw)
    kw = dict(steps=30, total_length=20, top_p=None, chat=False, record=True)
    full = sample.generate(sharp, tok, prompts, **kw)
    monkeypatch.setattr(tess2, "predict", counting)
    early = sample.generate(sharp, tok, prompts, early_exit=2, **kw)
    assert [g.steps_used for g in early] == [15, 30, 19, 30]
    assert sizes == [4] * 15 + [3] * 4 + [2] * 11  # exited rows cost nothing more
    for f, e in zip(full, early):
        n = e.steps_used
        assert torch.equal(e.predictions, f.predictions[:n])  # bit for bit until the row exits
        if n == 30:
            assert e.tokens == f.tokens and e.text == f.text


# -----------------------------------------------------------------------------
# Generation settings: the checkpoint's generation_config.json, the released defaults, overrides


def test_a_checkpoint_without_generation_config_gets_the_released_evaluation_defaults(model, tok):
    s = prompting.settings_for(None, 4096)
    assert (s.steps, s.top_p, s.total_length, s.length, s.guidance_steps, s.tau) == (100, 0.99, 2048, None, 1, 1.0)
    assert prompting.settings_for(None, 1024).total_length == 1024  # no longer than the model reads
    g = sample.generate(model, tok, ["the cat"], steps=2, details=True)[0]  # tiny model: 1024 positions
    assert g.steps_used == 2
    assert prompting.plan(tok, ["the cat"], prompting.settings_for(None, 1024), model.args)[0].lengths == [1024]


def test_generation_config_gives_the_defaults_and_flags_override_them(tmp_path, tok, capsys):
    ckpt = write_checkpoint(tmp_path / "m")
    with open(os.path.join(ckpt, "generation_config.json"), "w") as f:
        json.dump({"steps": 3, "top_p": 0.9, "total_length": 20, "guidance_steps": 2, "chat": False}, f)
    m = Transformer.from_pretrained(ckpt, verbose=False)
    assert m.generation_config["total_length"] == 20
    s = prompting.settings_for(m.generation_config, 1024)
    assert (s.steps, s.top_p, s.total_length, s.guidance_steps, s.chat) == (3, 0.9, 20, 2, False)
    g = sample.generate(m, tok, ["the cat"], details=True)[0]
    assert g.steps_used == 3
    assert prompting.settings_for(m.generation_config, 1024, length=5).total_length is None  # --length replaces it
    assert prompting.settings_for(m.generation_config, 1024, steps=7, top_p=None).steps == 7
    gens = sample.main(["--model", ckpt, "--prompt", "the cat", "--json", "--steps", "2"])
    assert gens[0].steps_used == 2 and json.loads(capsys.readouterr().out)["steps_used"] == 2


def test_no_flag_re_declares_a_sampling_default():
    """Flags left out are None, the checkpoint's: only the flags given override its settings."""
    assert sample.parse_args(["--prompt", "x"]).overrides == {}
    a = sample.parse_args(["--prompt", "x", "--no-chat", "--argmax", "--compile", "--no-guidance-ckpt", "--steps", "3"])
    assert a.overrides == dict(chat=False, top_p=None, compile=True, guidance_ckpt=False, steps=3)


def spy_steps(monkeypatch):
    """Each sample.step call's rows as (sampler, shed, pad_id, length), recorded before the step."""
    seen, real = [], sample.step

    def step(model, state, *args, **kw):
        seen.append([(state.sampler[b], state.shed[b], state.pad_id[b], state.lengths[b])
                     for b in range(len(state.keys))])
        return real(model, state, *args, **kw)
    monkeypatch.setattr(sample, "step", step)
    return seen


def test_sampler_and_shed_reach_the_reverse_process_from_keywords_and_the_checkpoint(tok, monkeypatch):
    """A row whose last 3 positions are [PAD] from the first step sheds them after step M = 2."""
    prompt, fixed, answer = fixed_text_setup(tok)
    L = len(fixed.target)
    seen = spy_steps(monkeypatch)
    assert sample.generate(fixed, tok, [prompt], steps=6, length=8, sampler="ddim", shed=2) == ["the sea is love"]
    assert [rows[0] for rows in seen] == [("ddim", 2, tok.pad_id, L)] * 2 + [("ddim", 2, tok.pad_id, L - 3)] * 4
    seen.clear()
    sample.generate(fixed, tok, [prompt], steps=3, length=8)  # the defaults: stochastic, never sheds
    assert [rows[0] for rows in seen] == [("stochastic", None, None, L)] * 3
    fixed.generation_config = {"sampler": "ddim", "shed": 1}
    for keywords, expected in (({}, ("ddim", 1)), (dict(sampler="stochastic"), ("stochastic", 1)),
                               (dict(shed=2, sampler=None), ("ddim", 2))):
        seen.clear()
        sample.generate(fixed, tok, [prompt], steps=3, length=8, **keywords)
        assert seen[0][0][:2] == expected, keywords


def test_the_sampler_and_shed_flags_give_generates_answer(ckpt, model, tok, capsys, monkeypatch):
    assert sample.parse_args(["--prompt", "x", "--sampler", "ddim", "--shed", "3"]).overrides == dict(
        sampler="ddim", shed=3)
    seen = spy_steps(monkeypatch)
    argv = ["--model", ckpt, "--prompt", "the cat", "--prompt", "a dog", "--steps", "4", "--length", "6", "--json"]
    sample.main(argv + ["--sampler", "ddim", "--shed", "3"])
    assert {row[:3] for rows in seen for row in rows} == {("ddim", 3, tok.pad_id)}
    got = [json.loads(line)["tokens"] for line in capsys.readouterr().out.splitlines()]
    want = sample.generate(model, tok, ["the cat", "a dog"], steps=4, length=6, sampler="ddim", shed=3, details=True)
    assert got == [g.tokens for g in want]
    sample.main(argv)
    assert [json.loads(line)["tokens"] for line in capsys.readouterr().out.splitlines()] != got


CHAT = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"},
        {"role": "user", "content": "the sea"}]


def test_generate_takes_a_chat_as_one_prompt_laid_out_as_in_training(model, tok, monkeypatch):
    rows, real = [], sample.start
    monkeypatch.setattr(sample, "start", lambda ids, *a, **k: rows.append(ids.tolist()) or real(ids, *a, **k))
    one = sample.generate(model, tok, CHAT, steps=3, length=5, seed=2, details=True)
    both = sample.generate(model, tok, ["write a sonnet", CHAT], steps=3, length=5, seed=1, details=True)
    assert len(one) == 1 and one[0].prompt == CHAT and both[1].prompt == CHAT
    assert one[0].tokens == both[1].tokens  # prompt j has seed + j, a chat as any prompt
    # BOS, <|user|> the cat <|assistant|> a dog EOS, <|user|> the sea <|assistant|>, then 5 generated positions
    assert rows[0][0][:20] == [0, 4, 6, 5, 8, 10, 4, 7, 5, 9, 11, 1, 4, 6, 5, 8, 15, 4, 7, 5]
    assert len(rows[0][0]) == 25


def test_a_prompts_file_chat_reaches_the_outputs(ckpt, model, tok, tmp_path, capsys):
    prompts, page = tmp_path / "p.jsonl", tmp_path / "page.html"
    prompts.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "the cat"}) + "\n")
    sample.main(["--model", ckpt, "--prompts-file", str(prompts), "--steps", "3", "--length", "5", "--seed", "2",
                 "--json", "--html", str(page)])
    outputs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in outputs] == [CHAT, "the cat"]
    assert outputs[0]["tokens"] == sample.generate(model, tok, CHAT, steps=3, length=5, seed=2, details=True)[0].tokens
    assert html.escape("<|user|>\nthe cat\n<|assistant|>\na dog\n<|user|>\nthe sea\n") in page.read_text()


SPY = """
import json, os, sys
import sample
real = sample.run
def run(model, tok, batches, *args, **kwargs):  # records which process sampled which batch (by its seeds)
    with open(os.path.join(os.environ["SPY_DIR"], "rank" + os.environ.get("RANK", "0")), "a") as f:
        f.write(json.dumps([b.seeds for b in batches]) + "\\n")
    return real(model, tok, batches, *args, **kwargs)
sample.run = run
sample.run_cli(sample.main, "sample.py", sys.argv[1:])
"""


def run_sample(tmp_path, name, argv, processes):
    """sample.py ARGV (through SPY) alone or under torch.distributed.run -> (stdout, {rank: batches' seeds})."""
    spy, calls = tmp_path / "spy.py", tmp_path / f"calls-{name}"
    spy.write_text(SPY)
    calls.mkdir()
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                                 if processes > 1 else [])
    env = dict(os.environ, SPY_DIR=str(calls), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(launch + [str(spy), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout, {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in calls.iterdir()}


@pytest.mark.slow
def test_torchrun_spreads_the_prompts_and_the_first_process_writes_the_one_process_output(ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in ["the cat", "a dog", {"messages": CHAT},
                                                               "write a sonnet", "the sea"]))
    flags = ["--model", ckpt, "--prompts-file", str(prompts), "--steps", "3", "--length", "4", "--batch-size", "2",
             "--seed", "5", "--json"]
    alone, alone_calls = run_sample(tmp_path, "alone", flags + ["--html", str(tmp_path / "one.html")], 1)
    two, two_calls = run_sample(tmp_path, "two", flags + ["--html", str(tmp_path / "two.html")], 2)
    assert alone_calls == {"rank0": [[[5, 6]], [[7, 8]], [[9]]]}  # the batch at prompt j: seeds from seed + j
    assert two_calls == {"rank0": [[[5, 6]], [[9]]], "rank1": [[[7, 8]]]}  # each batch sampled once, by one process
    drop_seconds = lambda out: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                                for line in out.splitlines()]
    assert drop_seconds(two) == drop_seconds(alone) and len(drop_seconds(alone)) == 5
    assert [r["prompt"] for r in drop_seconds(two)] == ["the cat", "a dog", CHAT, "write a sonnet", "the sea"]
    page = lambda name: re.sub(r"[0-9.]+ s\)", "", (tmp_path / name).read_text())  # noqa: E731  (wall times aside)
    assert page("two.html") == page("one.html")
    text, _ = run_sample(tmp_path, "text", flags[:-1], 2)
    assert text == "".join(r["text"] + "\n\n" for r in drop_seconds(alone))


def test_recording_every_step_refuses_shedding(model, tok):
    with pytest.raises(ValueError, match="record=True keeps every position's prediction at every step, but shed"):
        sample.generate(model, tok, ["the cat"], steps=2, length=4, shed=1, record=True)


def test_the_shipped_model_carries_short_rows(tok):
    s = prompting.settings_for(read_json(os.path.join(ROOT, sample.DEFAULT_MODEL, "generation_config.json")), 1024)
    assert s.total_length <= 256 and s.guidance_steps == 1


def test_a_tokenizer_without_pad_that_matches_the_model_samples(tmp_path):
    """Sampling never needs [PAD]: the tokenizer gets it as an extra id, which the model lacks."""
    words = ["<s>", "</s>", "<unk>", "<|", "|>", "user", "assistant"] + WORDS
    torch.manual_seed(0)
    m = Transformer(preset("tiny", timestep_embed=True, causal=False, vocab_size=len(words))).init_weights()
    path = tmp_path / "nopad"
    m.save_pretrained(str(path))
    t = Tokenizer(word_tokenizer(path, words))
    assert t.pad_added and t.vocab_size == len(words) + 1
    out = sample.generate(Transformer.from_pretrained(str(path), verbose=False), t, ["the cat"], steps=2, length=4,
                          details=True)[0]
    assert len(out.tokens) <= 4 and all(x < len(words) for x in out.tokens)


# -----------------------------------------------------------------------------
# Reward guidance


def test_reward_guidance_makes_the_liked_token_more_frequent(model, tok):
    liked = tok.encode("sea")[0]
    rm = LikesToken(liked)
    freq, rewards = [], []
    for eta in (0.0, 0.5, 2.0, 5.0):
        gens = sample.generate(model, tok, ["the cat", "a dog"], steps=6, length=16, seed=0, reward_model=rm, eta=eta,
                               guidance_steps=3, details=True)
        tokens = [x for g in gens for x in g.tokens]
        freq.append(tokens.count(liked) / max(1, len(tokens)))
        b = batch(tok, [g.text for g in gens], total_length=20, chat=False)
        rewards.append(rm(embeds=rm.embed_tokens(b.ids)).mean().item())
    assert freq == sorted(freq) and freq[-1] > 0.5 > freq[0]
    assert rewards == sorted(rewards) and rewards[-1] > rewards[0]


def test_guidance_defaults_to_one_step_and_freezes_the_reward_model(model, tok, monkeypatch):
    torch.manual_seed(1)
    rm = Transformer(preset("tiny", head="score", vocab_size=V)).init_weights().eval()
    seen = []

    def spy(rm_, x, ids, span, eta, steps, tau, **kw):
        seen.append((steps, eta, all(not p.requires_grad for p in rm_.parameters())))
        return real(rm_, x, ids, span, eta, steps, tau, **kw)
    real = tess2.reward_guidance
    monkeypatch.setattr(tess2, "reward_guidance", spy)
    sample.generate(model, tok, ["the cat"], steps=2, length=4, reward_model=rm)
    assert seen == [(1, 0.25, True)] * 2  # G = 1 and eta = 0.25 by default, weights frozen meanwhile
    assert all(p.requires_grad for p in rm.parameters())  # and given back as they were


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
    with pytest.raises(ValueError, match="nothing to generate"):
        sample.generate(model, tok, ["the cat"], steps=2, length=0)
    with pytest.raises(ValueError, match="total-length"):
        sample.generate(model, tok, ["the cat sat on the mat"], steps=2, length=8, total_length=10)
    with pytest.raises(ValueError, match="whole number >= 1"):
        sample.generate(model, tok, ["the <mask:-1> cat"], steps=2)


def cli_error(argv, capsys, code=2):
    with pytest.raises(SystemExit) as e:
        sample.run_cli(sample.main, "sample.py", argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def bad_checkpoints(root, ckpt):
    """Folders that hold a user's usual mistakes."""
    import shutil
    made = {}
    for name in ("truncated", "wrong-type", "no-tokenizer", "ar"):
        made[name] = shutil.copytree(ckpt, root / name)
    cfg = (made["truncated"] / "config.json").read_text()
    (made["truncated"] / "config.json").write_text(cfg[:len(cfg) // 2])
    c = json.loads(cfg)
    (made["wrong-type"] / "config.json").write_text(json.dumps({**c, "hidden_size": "64"}))
    os.unlink(made["no-tokenizer"] / "tokenizer.json")
    c_ar = {**c, "architectures": ["MistralForCausalLM"], "timestep_embed": False, "causal": True}
    (made["ar"] / "config.json").write_text(json.dumps(c_ar))
    os.unlink(made["ar"] / "model.safetensors")
    Transformer(preset("tiny", vocab_size=V)).save_pretrained(str(root / "ar-weights"))
    shutil.copy(root / "ar-weights" / "model.safetensors", made["ar"])
    run = root / "run"
    shutil.copytree(ckpt, run / "step-0000010")
    return made, run


def test_user_mistakes_are_one_message_with_what_to_do(ckpt, capsys, tmp_path, monkeypatch):
    """Each case: exit status 2, one line `sample.py: error: ...` naming the cause, no traceback, and
    nothing written (no --json line on stdout, no --html page)."""
    made, run = bad_checkpoints(tmp_path, ckpt)
    files = {"missing": tmp_path / "nope.txt", "dir": tmp_path, "latin1": tmp_path / "p.txt",
             "badjson": tmp_path / "bad.jsonl", "noprompt": tmp_path / "np.jsonl", "empty": tmp_path / "empty.txt",
             "blank": tmp_path / "blank.jsonl", "assistant": tmp_path / "assistant.jsonl",
             "chatgap": tmp_path / "chatgap.jsonl", "superscript": tmp_path / "sup.txt"}
    files["latin1"].write_bytes("caf\xe9\n".encode("latin-1"))
    files["badjson"].write_text('"ok"\n\n{"prompt": "x"\n')
    files["noprompt"].write_text('{"text": "x"}\n')
    files["empty"].write_text("")
    files["blank"].write_text("\n  \n")
    files["assistant"].write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    files["chatgap"].write_text(json.dumps({"messages": [{"role": "user", "content": "the <mask:2> cat"}]}) + "\n")
    files["superscript"].write_text("To be <mask:\u00b3> be\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    m = ["--model", ckpt, "--prompt", "the cat"]
    f = lambda name: ["--model", ckpt, "--prompts-file", str(files[name])]  # noqa: E731
    cases = [  # (argv, phrase of the message)
        (["--model", str(tmp_path / "none"), "--prompt", "x"], "no checkpoint directory"),
        (["--model", str(run), "--prompt", "x"], "training run folder: pass one of its checkpoints"),
        (["--model", str(made["ar"]), "--prompt", "x"], "not a diffusion model"),
        (["--model", str(made["truncated"]), "--prompt", "x"], "config.json is not valid JSON"),
        (["--model", str(made["wrong-type"]), "--prompt", "x"], "hidden_size = '64' should be int"),
        (["--model", str(made["no-tokenizer"]), "--prompt", "x"], "has no tokenizer.json"),
        (["--model", "someone/not-cached", "--prompt", "x"], "could not be fetched from the Hugging Face Hub"),
        (m + ["--device", "meta"], "sampling runs on cpu or cuda"),
        (m + ["--device", "nonsense"], "is not a device"),
        (m + ["--device", "cpu:5"], "sample.py: error: --device cpu:5: a CPU has no index: use cpu"),
        (f("missing"), "does not exist"),
        (f("dir"), "is a directory"),
        (f("latin1"), "is not UTF-8"),
        (f("badjson"), "line 3: not JSON"),
        (f("noprompt"), "line 1: expected a JSON string"),
        (f("empty"), f"--prompts-file {files['empty']} holds no prompt (it is empty or blank)"),
        (f("blank"), f"--prompts-file {files['blank']} holds no prompt (it is empty or blank)"),
        (f("assistant"), f"{files['assistant']}, line 1: a chat starts with a user message"),
        (f("chatgap"), f"{files['chatgap']}, line 1: a chat's messages cannot hold <mask:N> gaps"),
        (f("superscript") + ["--no-chat"], "'\u00b3' is not a number written in the digits 0-9"),
        (m + ["--eta", "nan"], "sample.py: error: --eta must be a finite number >= 0, got nan"),
        (m + ["--eta", "-1"], "sample.py: error: --eta must be a finite number >= 0, got -1"),
        (m + ["--eta", "1e39"], "sample.py: error: --eta must be a finite number >= 0, got 1e39, over float32's"),
        (m + ["--tau", "0"], "sample.py: error: --tau must be a finite number > 0, got 0"),
        (m + ["--tau", "-1"], "sample.py: error: --tau must be a finite number > 0, got -1"),
        (m + ["--steps", "0"], "sample.py: error: --steps must be a positive integer, got 0"),
        (m + ["--steps", "1e20"], "sample.py: error: --steps must be a positive integer below 2**63, got 1e20"),
        (m + ["--steps", "2.5"], "sample.py: error: --steps must be a positive integer, got 2.5"),
        (m + ["--seed", str(2**70)], f"sample.py: error: --seed must be a whole number in [0, 2**63), got {2**70}"),
        (m + ["--seed", "-1"], "sample.py: error: --seed must be a whole number in [0, 2**63), got -1"),
        (m + ["--top-p", "0"], "sample.py: error: --top-p must be a number in (0, 1], got 0"),
        (m + ["--top-p", "1.5"], "sample.py: error: --top-p must be a number in (0, 1], got 1.5"),
        (m + ["--top-p", "0.5", "--argmax"], "sample.py: error: argument --argmax: not allowed with argument --top-p"),
        (m + ["--threads", "0"], "sample.py: error: --threads must be a positive integer, got 0"),
        (m + ["--batch-size", "0"], "sample.py: error: --batch-size must be a positive integer, got 0"),
        (m + ["--guidance-steps", "0"], "sample.py: error: --guidance-steps must be a positive integer, got 0"),
        (m + ["--early-exit", "0"], "sample.py: error: --early-exit must be a positive integer, got 0"),
        (m + ["--total-length", "0"], "sample.py: error: --total-length must be a positive integer, got 0"),
        (m + ["--length", "-1"], "sample.py: error: --length must be 0 or a positive integer, got -1"),
        (m + ["--shed", "0"], "sample.py: error: --shed must be a positive integer, got 0"),
        (m + ["--sampler", "euler"], "sample.py: error: argument --sampler: invalid choice: 'euler'"),
        (m + ["--length", "4", "--total-length", "20"],
         "sample.py: error: --length and --total-length both set the length of a row: give one"),
        (m + ["--length", "0"], "leaves nothing to generate"),
        (m + ["--html", str(tmp_path / "no-dir" / "x.html")], "cannot write a file there"),
        (m + ["--shed", "2", "--length", "4", "--html", str(tmp_path / "shed.html")],
         "sample.py: error: --html records every position at every step, but shedding (--shed 2) stops computing"),
        (["--model", ckpt, "--prompt", "the <mask:-1> cat", "--no-chat"], "a gap is <mask:N>"),
        (["--model", ckpt], "no prompt"),
    ]
    if not torch.cuda.is_available():
        cases.append((m + ["--device", "cuda"], "no CUDA GPU"))
        cases.append((m + ["--device", "cuda:1"], "no CUDA GPU"))
    page = tmp_path / "page.html"
    for argv, phrase in cases:
        argv = argv + ["--json"] + ([] if "--html" in argv else ["--html", str(page)])
        with pytest.raises(SystemExit) as e:
            sample.run_cli(sample.main, "sample.py", argv)
        out, err = capsys.readouterr()
        assert e.value.code == 2 and "Traceback" not in err, (argv, err)
        assert err.startswith("sample.py: error: ") and phrase in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
        assert out == "" and not page.exists() and not (tmp_path / "shed.html").exists(), argv


def test_a_bad_generation_config_is_blamed_on_its_file_and_key(tmp_path, tok, capsys):
    """Not on a flag the user never gave; a flag that overrides the bad value makes it harmless."""
    bad = write_checkpoint(tmp_path / "m")
    config = os.path.join(bad, "generation_config.json")
    for values, words in (({"steps": 0}, "steps must be a whole number of at least 1, got 0"),
                          ({"top_p": "high"}, "top_p must be in (0, 1], got 'high' (for argmax: --argmax, top_p=None)"),
                          ({"sampler": "euler"}, "sampler must be one of stochastic, ddim, got 'euler'"),
                          ({"chat": "yes"}, "chat must be true or false, got 'yes'")):
        with open(config, "w") as f:
            json.dump({"total_length": 20, **values}, f)
        err = cli_error(["--model", bad, "--prompt", "the cat"], capsys)
        assert err == f"sample.py: error: {config}: {words}\n"
        m = Transformer.from_pretrained(bad, verbose=False)
        with pytest.raises(ValueError, match=f"^the checkpoint's generation_config.json: {re.escape(words)}$"):
            sample.generate(m, tok, ["the cat"])
    with open(config, "w") as f:
        json.dump({"total_length": 20, "steps": 0}, f)
    assert sample.main(["--model", bad, "--prompt", "the cat", "--steps", "2", "--json"])[0].steps_used == 2


def test_an_empty_answer_is_noted_with_what_the_model_produced(ckpt, capsys, monkeypatch):
    newlines = prompting.Generation("the cat", "\n\n", [9, 9])
    monkeypatch.setattr(sample, "run", lambda *a, **k: [newlines])
    sample.main(["--model", ckpt, "--prompt", "the cat", "--length", "3"])
    out, err = capsys.readouterr()
    assert err == "sample.py: note: prompt 0 got an empty answer: the model produced only newlines: 2 tokens, " \
                  "'\\n\\n'\n" and out == "\n\n\n"


def test_cli_refuses_a_missing_default_model_and_reward_model(ckpt, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sample, "DEFAULT_MODEL", str(tmp_path / "no-model"))  # whether or not the repo ships one
    monkeypatch.setattr(sample, "DEFAULT_REWARD_MODEL", str(tmp_path / "no-rm"))
    assert "pass --model" in cli_error(["--prompt", "hi"], capsys)
    # --eta alone guides with the default reward model: refused when that is missing
    assert "pass --reward-model" in cli_error(["--model", ckpt, "--prompt", "hi", "--eta", "0.25"], capsys)


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
    outputs = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["prompt"] for r in outputs] == ["write a sonnet <about> & the sea", "the cat <mask:2> on the mat"]
    for r in outputs:
        assert set(r) == {"prompt", "text", "tokens", "steps_used", "seconds"} and r["steps_used"] == 4
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    parser = Balanced()
    parser.feed(text)
    parser.close()
    assert parser.stack == ["html"] or parser.stack == []
    assert html.escape(outputs[0]["text"]) in text and "&lt;about&gt; &amp; the sea" in text
    assert outputs[0]["text"] in "".join(parser.text)


# -----------------------------------------------------------------------------
# Infilling


def test_an_infilling_row_is_the_process_written_out(sharp, tok):
    """Gaps inside a prompt (span positions in several runs) follow the written-out process too."""
    b = batch(tok, ["the cat <mask:3> on the mat <mask:2> sea"], chat=False)
    for top_p in (None, 0.6):
        tokens, _ = sample.diffuse(sharp, b.ids, b.span_mask, [4], steps=6, top_p=top_p)
        assert torch.equal(tokens, reverse_process_by_hand(sharp, b.ids, b.span_mask, 4, 6, top_p))


# -----------------------------------------------------------------------------
# The reverse process as a state and one step: rows leave and join between steps


def run_to_the_end(model, state, done=None):
    done = {} if done is None else done
    while state.keys:
        for key, tokens, n in sample.step(model, state):
            done[key] = (tokens, n)
    return done


def test_a_row_that_joins_a_running_batch_gives_what_it_gives_alone(sharp, tok):
    """Two rows run 3 of their 8 steps; then a row joins with its own seed, step count, projection
    (argmax) and a longer row, to which the batch is padded (masked out of attention). Each row ends
    with the tokens and the step count of its run alone."""
    first = batch(tok, ["the cat", "a dog sat on"], length=6)
    late = batch(tok, ["write a sonnet about the sea and the sun"], length=9)
    assert late.ids.shape[1] > first.ids.shape[1]
    state = sample.start(first.ids, first.span_mask, [1, 2], V, steps=8, top_p=0.6, lengths=first.lengths)
    done = {}
    for _ in range(3):
        assert sample.step(sharp, state) == []
    sample.join(state, sample.start(late.ids, late.span_mask, [7], V, steps=5, top_p=None, keys=["late"]))
    assert state.keys == [0, 1, "late"] and state.taken == [3, 3, 0] and state.ids.shape[1] == late.ids.shape[1]
    run_to_the_end(sharp, state, done)
    for key, b, seed in ((0, 0, 1), (1, 1, 2)):
        n = first.lengths[b]
        alone, steps = sample.diffuse(sharp, first.ids[b:b + 1, :n], first.span_mask[b:b + 1, :n], [seed], steps=8,
                                      top_p=0.6)
        assert torch.equal(done[key][0][:n], alone[0]) and done[key][1] == int(steps[0]) == 8, key
    alone, _ = sample.diffuse(sharp, late.ids, late.span_mask, [7], steps=5, top_p=None)
    assert torch.equal(done["late"][0], alone[0]) and done["late"][1] == 5


def test_step_leaves_finished_rows_out_and_reports_each_once(sharp, tok):
    b = batch(tok, ["the cat", "a dog"], length=4)
    state = sample.start(b.ids, b.span_mask, [1, 2], V, steps=3, top_p=0.6, lengths=b.lengths)
    short = sample.start(b.ids[:1], b.span_mask[:1], [3], V, steps=1, top_p=0.6, keys=["short"])
    sample.join(state, short)
    ended = sample.step(sharp, state)
    assert [key for key, _, _ in ended] == ["short"] and state.keys == [0, 1] and len(state.S) == 2
    assert [key for key, _, _ in sample.step(sharp, state)] == []
    assert [(key, n) for key, _, n in sample.step(sharp, state)] == [(0, 3), (1, 3)] and state.keys == []


def test_generate_with_steps_alone_keeps_the_shipped_models_other_defaults():
    """generate(model, tok, prompts, steps=10): rows of the shipped generation_config.json's 160
    positions (the released default, 2048, would not fit its 1024), top-p 0.99, the chat template."""
    path = os.path.join(ROOT, sample.DEFAULT_MODEL)
    shipped, shipped_tok = Transformer.from_pretrained(path, verbose=False).eval(), Tokenizer(path)
    g = sample.generate(shipped, shipped_tok, ["Continue this speech by ROMEO:"], steps=2, record=True)[0]
    assert g.steps_used == 2 and g.predictions.shape == (2, 160)
    ids, _ = prompting.encode_prompt(shipped_tok, "Continue this speech by ROMEO:")
    assert g.predictions[0, :len(ids)].tolist() == ids  # templated: the chat template is the checkpoint's


# -----------------------------------------------------------------------------
# --compile


@pytest.mark.slow  # compiling takes 5-30 s
def test_the_compiled_step_equals_eager_without_graph_breaks():
    """sample.py --compile: torch.compile(predict, fullgraph=True) fails on any graph break."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny", timestep_embed=True, causal=False, num_hidden_layers=1)).init_weights().eval()
    g = torch.Generator().manual_seed(1)
    ids, span = torch.randint(512, (2, 12), generator=g), torch.arange(12).expand(2, 12) >= 4
    S, t = 5 * torch.randn(2, 12, 512, generator=g), torch.rand(2, generator=g)
    prev = 3 * torch.randn_like(S)
    real = torch.arange(ids.shape[1]) < torch.tensor([12, 9])[:, None]  # rows of their own length
    step = fused_sampling.compiled_predict()
    with torch.no_grad():
        for kw in (dict(prev_logits=prev, key_padding_mask=real), dict(prev_logits=None)):
            torch.testing.assert_close(step(m, ids, span, S, t, **kw), tess2.predict(m, ids, span, S, t, **kw),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiling takes 5-30 s
def test_the_compiled_sampler_equals_eager(model, tok):
    """Self-conditioning feeds each step's logits to the next: the compiled sampler gives the eager
    one's tokens, with rows of two lengths (a key padding mask) and rows leaving (early exit)."""
    b = batch(tok, ["the cat", "write a sonnet about the sea"], length=6)
    kw = dict(steps=6, top_p=0.6, lengths=b.lengths, early_exit=1)
    eager = sample.diffuse(model, b.ids, b.span_mask, [1, 2], **kw)
    compiled = sample.diffuse(model, b.ids, b.span_mask, [1, 2], compiled=True, **kw)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


# -----------------------------------------------------------------------------
# Reward guidance's memory


def test_guidance_with_frozen_weights_and_recomputed_blocks_is_the_same_update_kept_smaller():
    """sample.guidance_mode: frozen reward-model weights and per-block recomputation change what
    the backward keeps, not the update."""
    torch.manual_seed(1)
    rm = Transformer(preset("tiny", head="score")).init_weights().eval()
    g = torch.Generator().manual_seed(1)
    ids, span = torch.randint(512, (2, 12), generator=g), torch.arange(12).expand(2, 12) >= 3
    x = 3 * torch.randn(*ids.shape, 512, generator=torch.Generator().manual_seed(7))
    params = {p.data_ptr() for p in rm.parameters()}

    def run():
        kept = [0]

        def pack(t):
            kept[0] += 0 if t.data_ptr() in params else t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return tess2.reward_guidance(rm, x, ids, span, eta=0.5), kept[0]
    plain, kept_plain = run()
    with sample.guidance_mode(rm, checkpointing=False):
        frozen, kept_frozen = run()
    with sample.guidance_mode(rm, checkpointing=True):
        assert all(not p.requires_grad for p in rm.parameters()) and rm.gradient_checkpointing
        recomputed, kept_recomputed = run()
    assert all(p.requires_grad for p in rm.parameters()) and not rm.gradient_checkpointing  # restored
    torch.testing.assert_close(frozen, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)
    assert kept_recomputed < kept_frozen < kept_plain


def test_recomputation_is_chosen_by_free_device_memory_not_by_device_type(monkeypatch):
    torch.manual_seed(1)
    rm = Transformer(preset("tiny", head="score", vocab_size=V)).init_weights().eval()
    args = rm.args
    per_token = (6 * args.hidden_size + 3 * args.intermediate_size + 2 * args.num_key_value_heads * args.head_dim) \
        * args.num_hidden_layers * 4 + 4 * V * 4  # fp32 weights; four fp32 (B, L, V) tensors
    free = 1000 * per_token
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (free, 10 * free))
    cuda = torch.device("cuda")
    assert not sample.recompute_reward_model(rm, 1000, V, cuda)  # fits
    assert sample.recompute_reward_model(rm, 1001, V, cuda)  # does not
    assert asked == [cuda, cuda]
    assert not sample.recompute_reward_model(rm, 10**9, V, torch.device("cpu")) and len(asked) == 2  # CPU: off


def test_sampling_guides_with_recomputation_where_memory_says_so(model, tok, monkeypatch):
    rm = LikesToken(tok.encode("sea")[0])
    seen = []
    real = tess2.reward_guidance
    monkeypatch.setattr(tess2, "reward_guidance", lambda r, *a, **k: seen.append(r.gradient_checkpointing) or
                        real(r, *a, **k))
    for memory_says, flag, expected in ((True, None, True), (False, None, False), (True, False, False)):
        monkeypatch.setattr(sample, "recompute_reward_model", lambda *a: memory_says)
        seen.clear()
        sample.generate(model, tok, ["the cat"], steps=2, length=3, reward_model=rm, guidance_ckpt=flag)
        assert seen == [expected] * 2
