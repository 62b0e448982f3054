"""
Shedding a settled tail (sample.start(shed=M), support/fused_sampling.shed_tails): once a row's
trailing positions have been [PAD] in the argmax for M steps in a row, it stops computing them.
A row computes exactly as in the dense run until the step it sheds; afterwards only the shed
positions are missing (they no longer attend or are attended): its noise at the kept positions
is still the dense run's (each row draws noise for all its span positions, kept or shed); a row
whose tail never settles is never changed; the batch narrows to its longest row.

The rows here come from a tiny random model whose logits `tail_model` pushes towards PAD at
positions >= TAIL and away from it before, so the trailing [PAD] is [TAIL, L) from the first step
and the row sheds at step M exactly.
"""
import pytest
import torch

import sample
import tess2
from model import Transformer, preset
from support import fused_sampling
from support.fused_sampling import normal_prefix_, _normal_prefix_cpu_, project_spans, renoise_spans_

V, PAD, OTHER, L, TAIL, N = 40, 39, 38, 16, 10, 8


@pytest.fixture(scope="module")
def sharp():
    """A tiny random model with large weights, whose predictions depend strongly on its inputs
    (also on positions it attends to: removing the tail changes what the others predict)."""
    torch.manual_seed(3)
    m = Transformer(preset("tiny", timestep_embed=True, causal=False, vocab_size=V)).init_weights(std=0.3)
    with torch.no_grad():
        m.timestep_embed.weight.normal_()
    return m.eval()


@pytest.fixture
def tail_model(monkeypatch):
    """tess2.predict with PAD pushed up by 100 at positions >= TAIL and down by 100 before them."""
    real = tess2.predict

    def predict(*args, **kw):
        logits = real(*args, **kw).clone()
        logits[:, :TAIL, PAD] -= 100.0
        logits[:, TAIL:, PAD] += 100.0
        return logits
    monkeypatch.setattr(tess2, "predict", predict)


def rows(lengths, seed=0):
    """Random context tokens (never PAD) and a span from position 3 to each row's end; (B, max) padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(30, (len(lengths), max(lengths)), generator=g)
    span = (torch.arange(max(lengths)) >= 3) & (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None])
    return ids, span


def run(model, state, seen=None):
    """The state to its end -> {key: (tokens, steps)}; seen, if given, gets a copy of the state at each step."""
    done = {}
    while state.keys:
        watch = None if seen is None else lambda s: seen.append(
            dict(logits=s.logits.clone(), S=s.S.clone(), lengths=list(s.lengths), keys=list(s.keys)))
        for key, tokens, n in sample.step(model, state, on_step=watch):
            done[key] = (tokens, n)
    return done


@pytest.mark.parametrize("top_p", [None, 0.8])
def test_a_row_computes_as_in_the_dense_run_until_it_sheds_its_tail(sharp, tail_model, top_p):
    """Bit for bit until step M, where the tail is shed: the same logits everywhere and, after the shed,
    the same S at the kept positions (the projection of the same logits, re-noised with the dense
    run's noise). From step M + 1 on the kept positions no longer see the tail: their logits differ."""
    ids, span = rows([L])
    M = 3
    dense, shed = [], []
    out_dense = run(sharp, sample.start(ids, span, [5], V, steps=N, top_p=top_p), dense)
    out_shed = run(sharp, sample.start(ids, span, [5], V, steps=N, top_p=top_p, shed=M, pad_id=PAD), shed)
    assert [s["lengths"] for s in shed] == [[L]] * M + [[TAIL]] * (N - M)  # shed right after step M's prediction
    for n in range(M):
        assert torch.equal(shed[n]["logits"], dense[n]["logits"]), n
    assert torch.equal(shed[M]["S"][0, 3:TAIL], dense[M]["S"][0, 3:TAIL])  # S after the shed: kept positions
    assert shed[M]["S"].shape[1] == TAIL  # the batch narrowed to the row's new length
    assert not torch.equal(shed[M]["logits"][0, :TAIL], dense[M]["logits"][0, :TAIL])
    (tokens, steps), (tokens_dense, steps_dense) = out_shed[0], out_dense[0]
    assert steps == steps_dense == N and tokens.shape == (L,)
    assert tokens[TAIL:].tolist() == [PAD] * (L - TAIL)  # the shed tail's tokens stay in the output
    assert torch.equal(tokens[:3], ids[0, :3])


@pytest.mark.parametrize("top_p", [None, 0.8])
def test_where_the_tail_is_not_attended_to_a_shed_row_is_the_dense_row(tail_model, monkeypatch, top_p):
    """A causal model: no kept position attends to the tail, so shedding it changes nothing at the kept
    positions, step after step, only if the row still draws the dense run's noise and uniforms for the
    positions it has shed. Not drawing them (the plain draw over the kept positions) changes the text."""
    torch.manual_seed(4)
    causal = Transformer(preset("tiny", timestep_embed=True, causal=True, vocab_size=V)).init_weights(std=0.3).eval()
    ids, span = rows([L])
    dense, shed = [], []
    out_dense = run(causal, sample.start(ids, span, [5], V, steps=N, top_p=top_p), dense)
    out_shed = run(causal, sample.start(ids, span, [5], V, steps=N, top_p=top_p, shed=2, pad_id=PAD), shed)
    assert shed[-1]["lengths"] == [TAIL]
    for a, b in zip(dense, shed):  # the same S at every step, bit for bit: the same tokens and noise
        assert torch.equal(b["S"][0, 3:TAIL], a["S"][0, 3:TAIL])
        # logits: a shorter causal pass rounds differently, by a few ulps of the pushed logits (|x| ~ 100,
        # ulp 7.6e-6), which self-conditioning carries on
        torch.testing.assert_close(b["logits"][0, :TAIL], a["logits"][0, :TAIL], rtol=0, atol=2e-4)
    assert torch.equal(out_shed[0][0], out_dense[0][0])
    monkeypatch.setattr(fused_sampling, "normal_prefix_", lambda x, total, g: x.normal_(generator=g))
    if top_p is not None:
        monkeypatch.setattr(fused_sampling, "project_spans", lambda logits, best, where, top_p, g, draws:
                            project_spans(logits, best, where, top_p, g))
    out_plain = run(causal, sample.start(ids, span, [5], V, steps=N, top_p=top_p, shed=2, pad_id=PAD))
    assert not torch.equal(out_plain[0][0], out_dense[0][0])


def test_a_row_whose_tail_never_settles_is_never_changed(sharp, tail_model):
    """Row "A" sheds; row "B" (in its argmax the same pushed-up token, but that is not its [PAD]) never
    does. B is longer than A's new length, so after the shed the batch narrows to B: its tokens
    and steps are those of the dense run, and it never stops computing a position."""
    ids, span = rows([L, L - 2], seed=1)
    results = {}
    for shed in (None, 2):
        state = sample.start(ids[:1], span[:1], [1], V, steps=N, top_p=0.8, shed=shed, pad_id=PAD, keys=["A"])
        sample.join(state, sample.start(ids[1:, :L - 2], span[1:, :L - 2], [2], V, steps=N, top_p=0.8, shed=shed,
                                        pad_id=OTHER, keys=["B"]))
        seen = []
        results[shed] = run(sharp, state, seen), seen
    (dense, _), (out, seen) = results[None], results[2]
    assert [s["lengths"] for s in seen][1:3] == [[L, L - 2], [TAIL, L - 2]]
    assert all(s["logits"].shape[1] == L - 2 for s in seen[2:])  # the width of B, the longest row now
    assert torch.equal(out["B"][0], dense["B"][0]) and out["B"][1] == dense["B"][1] == N
    assert out["B"][0].shape == (L - 2,)
    assert not torch.equal(out["A"][0], dense["A"][0])  # (A is changed: the comparison has power)


def test_shedding_with_nothing_settled_changes_nothing(sharp):
    """shed=M on rows that never predict their [PAD] at the end: the dense run, logits bit for bit."""
    ids, span = rows([L, L - 3], seed=2)
    dense, shed = [], []
    out_dense = run(sharp, sample.start(ids, span, [1, 2], V, steps=N, top_p=0.8, lengths=[L, L - 3]), dense)
    out_shed = run(sharp, sample.start(ids, span, [1, 2], V, steps=N, top_p=0.8, lengths=[L, L - 3], shed=1,
                                       pad_id=99), shed)  # an id the model never predicts
    assert all(torch.equal(a["logits"], b["logits"]) for a, b in zip(dense, shed)) and len(dense) == len(shed) == N
    assert all(torch.equal(out_dense[k][0], out_shed[k][0]) for k in (0, 1))


def test_the_batch_narrows_and_the_model_computes_fewer_positions(sharp, tail_model, monkeypatch):
    ids, span = rows([L, L])
    widths = []
    real = tess2.predict
    monkeypatch.setattr(tess2, "predict", lambda m, x, *a, **kw: widths.append(x.shape[1]) or real(m, x, *a, **kw))
    tokens, steps = sample.diffuse(sharp, ids, span, [1, 2], steps=N, top_p=None, shed=2, pad_id=PAD)
    assert widths == [L, L] + [TAIL] * (N - 2) and steps.tolist() == [N, N]
    assert (tokens[:, TAIL:] == PAD).all()


def test_a_row_keeps_its_eos_and_one_span_position(sharp, monkeypatch):
    """The trailing [PAD] run stops at an EOS (here token 2 at TAIL - 1, never shed); a row whose whole
    span is [PAD] keeps its first span position. An infilling row ending in context never sheds."""
    real = tess2.predict

    def predict(*args, **kw):
        logits = real(*args, **kw).clone()
        logits[:, TAIL - 1, 2] += 100.0
        logits[:, TAIL:, PAD] += 100.0
        logits[1, :, PAD] += 200.0  # row 1: all [PAD]
        return logits
    monkeypatch.setattr(tess2, "predict", predict)
    ids, span = rows([L, L, L])
    span[2, -2:] = False  # row 2: its last two positions are context
    state = sample.start(ids, span, [1, 2, 3], V, steps=N, top_p=None, shed=1, pad_id=PAD)
    sample.step(sharp, state)
    assert state.lengths == [TAIL, 4, L] and state.where[:2] == [slice(3, TAIL), slice(3, 4)]
    assert [len(t) for t in state.tails] == [L - TAIL, L - 4, 0]
    done = run(sharp, state)
    assert done[0][0][TAIL - 1] == 2 and done[1][0][3:].tolist() == [PAD] * (L - 3)


def test_start_refuses_an_unknown_sampler_and_shedding_without_pad():
    ids, span = rows([L])
    for kw in (dict(sampler="DDIM"), dict(shed=3), dict(shed=0, pad_id=PAD)):
        with pytest.raises(ValueError, match="sampler .*shed"):
            sample.start(ids, span, [0], V, **kw)


# -----------------------------------------------------------------------------
# The noise of a row that has shed: the dense run's at its kept positions, and every later draw


@pytest.mark.parametrize("V_, total, n", [(4096, 10, 3), (17, 7, 6), (33, 64, 33), (16, 5, 1), (32001, 3, 2)])
def test_a_prefix_of_the_noise_is_the_whole_draws_and_leaves_the_generator_where_it_does(V_, total, n):
    """normal_prefix_ (both ways: skipping words on the CPU, and the whole draw) against the whole
    (total, V) draw: its first n rows bit for bit and the next draw equal. Counts of values that are
    not multiples of 16 (V = 17, 33, 32001) check the CPU kernel's blocks of 16 and its redrawn tail."""
    whole_g = torch.Generator().manual_seed(7)
    whole = torch.empty(total, V_).normal_(generator=whole_g)
    after = torch.rand(5, generator=whole_g)
    for f in (normal_prefix_, _normal_prefix_cpu_, lambda x, t, g: x.copy_(torch.empty(t, V_).normal_(generator=g)[:n])):
        g = torch.Generator().manual_seed(7)
        x = torch.empty(n, V_)
        f(x, total, g)
        assert torch.equal(x, whole[:n]) and torch.equal(torch.rand(5, generator=g), after)


def test_re_noising_and_projecting_a_shed_row_draws_what_the_dense_row_draws():
    """renoise_spans_ and project_spans with draws = the dense span: at the kept positions, the dense
    row's S and tokens bit for bit; then both generators are at the same place."""
    g = torch.Generator().manual_seed(0)
    logits, S = 3 * torch.randn(1, 12, 50, generator=g), torch.zeros(1, 12, 50)
    tokens = torch.randint(50, (1, 12), generator=g)
    dense_g, shed_g = tess2.row_generators([4]), tess2.row_generators([4])
    dense_t = project_spans(logits, tokens, [slice(2, 12)], [0.9], dense_g)
    shed_t = project_spans(logits, tokens, [slice(2, 7)], [0.9], shed_g, draws=[10])
    assert torch.equal(shed_t[0, 2:7], dense_t[0, 2:7])
    dense_S = renoise_spans_(S.clone(), dense_t, [0.3], dense_g, [slice(2, 12)])
    shed_S = renoise_spans_(S.clone(), dense_t, [0.3], shed_g, [slice(2, 7)], draws=[10])
    assert torch.equal(shed_S[0, 2:7], dense_S[0, 2:7]) and torch.equal(shed_S[0, 7:], S[0, 7:])
    assert torch.equal(torch.rand(3, generator=dense_g[0]), torch.rand(3, generator=shed_g[0]))


def test_settled_counts_and_cuts_are_the_trailing_pad_run():
    """trailing_pad and shed_points restated on a hand-made batch."""
    best = torch.tensor([[1, 5, PAD, 7, PAD, PAD, PAD], [1, PAD, PAD, PAD, PAD, 3, 3], [1, 5, 6, PAD, PAD, 0, 0]])
    span = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    real = torch.arange(7) < torch.tensor([7, 7, 5])[:, None]  # row 2 is 5 long: its run ends there
    trailing = fused_sampling.trailing_pad(best, span, real, [PAD, PAD, PAD])
    assert trailing.int().tolist() == [[0, 0, 0, 0, 1, 1, 1], [0] * 7, [0, 0, 0, 1, 1, 0, 0]]
    assert not fused_sampling.trailing_pad(best, span, real, [None, None, None]).any()
    settled = torch.tensor([[0, 0, 0, 0, 2, 3, 3], [0] * 7, [0, 0, 0, 1, 4, 0, 0]])
    where = fused_sampling.span_positions(span)
    assert fused_sampling.shed_points(settled, real, [3, 3, 1], where) == [5, 7, 3]
    assert fused_sampling.shed_points(settled, real, [None, 3, 4], where) == [7, 7, 4]
