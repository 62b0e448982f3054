"""
tess2.py, equation by equation: the schedule, the simplex, the forward process, what the network
sees, the loss with self-conditioning, the UL2 masks and the projection. Each test is written from
METHOD.md (sections 1-7, 9-10), with the formula computed again here rather than called from tess2.py.
A tiny random bidirectional model with a timestep embedding, fp32, CPU.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tess2
from model import Transformer, preset
from tess2 import (add_noise, alpha_bar, alpha_bars, diffusion_loss, predict, prefix_mask,
                   random_segmentation, renoise, renoise_ddim, row_generators, row_noise, row_noise_, simplex,
                   t5_span_mask, ul2_mask)

K = 5.0  # simplex value k (§1)
T = 5000  # training timesteps (§2)


def tiny(seed=0, timestep_scale=1.0):
    """The tiny diffusion model. init_weights() zeroes the timestep embedding (as adaptation starts);
    tests that need it to matter give it a random value of size timestep_scale."""
    torch.manual_seed(seed)
    m = Transformer(preset("tiny", timestep_embed=True, causal=False)).init_weights()
    with torch.no_grad():
        m.timestep_embed.weight.normal_(std=timestep_scale)
    return m


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


def batch(B=2, L=12, V=512, seed=1):
    """Clean ids, a span mask (context at the start and in the middle, span elsewhere), a noisy
    simplex and per-row scaled times."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(V, (B, L), generator=g)
    span = torch.zeros(B, L, dtype=torch.bool)
    span[:, 3:7] = True
    span[:, 9:] = True
    span[1, 2] = True
    S = K * torch.randn(B, L, V, generator=g)
    t = torch.rand(B, generator=g)
    return ids, span, S, t


def reference_predict(model, ids, span, S, t, prev_logits=None):
    """§4 written out with nothing fused: p = (softmax(S) + softmax(prev)) / 2 (prev = 0 means
    uniform), h = p @ E.data + W_t t on span positions (E gets no gradient there, as in the released
    model), E[w] on context positions, a bidirectional pass, then the logits shifted right by one so
    that logits[:, j] predicts token j, zeros at j = 0."""
    E = model.embed_tokens.weight  # (V, D)
    if prev_logits is None:
        prev_logits = torch.zeros_like(S)
    p = (torch.softmax(S, -1) + torch.softmax(prev_logits, -1)) / 2  # (B, L, V)
    W_t = model.timestep_embed.weight[:, 0]  # (D,)
    h_span = p @ E.data + t[:, None, None] * W_t  # (B, L, D)
    h = torch.where(span[..., None], h_span, E[ids])
    logits = model(embeds=h, causal=False)  # (B, L, V), position i predicts token i+1
    return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)


def alpha_bar_formula(s):
    """§2 in numpy: f(s) = cos^2(((s + 1e-4) / (1 + 1e-4)) pi/2), alpha_bar = f(s) / f(0)."""
    f = lambda x: np.cos((x + 1e-4) / (1 + 1e-4) * np.pi / 2) ** 2
    return f(np.asarray(s, dtype=np.float64)) / f(0.0)


# -----------------------------------------------------------------------------
# Noise schedule (§2)


def test_alpha_bar_is_one_at_zero_and_vanishes_at_one():
    assert alpha_bar(0.0).item() == 1.0  # no noise at t = 0, exactly
    assert alpha_bars(T)[0].item() == 1.0
    assert alpha_bars(100)[0].item() == 1.0
    assert 0.0 <= alpha_bar(1.0).item() < 1e-12


def test_alpha_bar_matches_the_cosine_formula():
    s = [0.0, 1e-4, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0]
    expected = alpha_bar_formula(s)
    np.testing.assert_allclose(alpha_bar(torch.tensor(s, dtype=torch.float64)).numpy(), expected, rtol=1e-12, atol=1e-15)
    # two values by hand: at s = 1/2 the angle is ~pi/4, so alpha_bar ~ cos^2(pi/4) = 1/2
    assert alpha_bar(0.5).item() == pytest.approx(
        math.cos((0.5 + 1e-4) / (1 + 1e-4) * math.pi / 2) ** 2 / math.cos(1e-4 / (1 + 1e-4) * math.pi / 2) ** 2,
        rel=1e-12)
    assert alpha_bar(0.5).item() == pytest.approx(0.5, abs=1e-3)


def test_alpha_bar_decreases_monotonically():
    curve = alpha_bar(torch.linspace(0, 1, 100_001, dtype=torch.float64))
    assert (curve.diff() < 0).all()
    assert (alpha_bars(T).diff() < 0).all()  # still strictly decreasing in the float32 training table


def test_alpha_bars_rediscretise_the_same_curve():
    """alpha_bars(N)[i] = alpha_bar(i / N), restated with math.cos and rounded to float32."""
    f = lambda s: math.cos((s + 1e-4) / (1 + 1e-4) * math.pi / 2) ** 2  # noqa: E731
    for N in (1, 7, 100, T):
        table = alpha_bars(N)
        assert table.shape == (N,) and table.dtype == torch.float32
        by_hand = torch.tensor([f(i / N) / f(0.0) for i in range(N)], dtype=torch.float64).float()
        assert torch.equal(table, by_hand)
    # inference with N = 100 steps visits every 50th training timestep
    assert torch.equal(alpha_bars(T)[::50], alpha_bars(100))
    with pytest.raises(ValueError, match="positive"):
        alpha_bars(0)


# -----------------------------------------------------------------------------
# Representation (Eq. 1) and forward process (Eq. 2)


def test_simplex_is_plus_k_at_the_token_and_minus_k_elsewhere():
    ids = torch.tensor([[0, 3, 9], [9, 9, 1]])
    s = simplex(ids, 10)
    assert s.shape == (2, 3, 10) and s.dtype == torch.float32
    assert torch.equal(s, 2 * K * F.one_hot(ids, 10).float() - K)
    assert torch.equal(s.argmax(-1), ids)
    assert set(s.unique().tolist()) == {-K, K}
    assert torch.equal(simplex(ids, 10, k=2.0), 4.0 * F.one_hot(ids, 10).float() - 2.0)


def test_add_noise_is_the_literal_forward_process():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(16, (3, 5), generator=g)
    eps = torch.randn(3, 5, 16, generator=g)
    eps_before = eps.clone()
    a = torch.tensor([1.0, 0.37, 1e-6])  # clean, half-way, almost pure noise
    S_t = add_noise(ids, eps, a)
    S_0 = 2 * K * F.one_hot(ids, 16).float() - K
    expected = a.sqrt()[:, None, None] * S_0 + (1 - a).sqrt()[:, None, None] * K * eps
    torch.testing.assert_close(S_t, expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(S_t[0], S_0[0])  # alpha_bar = 1: no noise at all
    assert torch.equal(eps, eps_before)  # the caller's noise is reused (self-conditioning): untouched


def test_add_noise_has_the_forward_process_mean_and_variance():
    n, L, V, a = 20_000, 3, 8, 0.3
    ids = torch.tensor([[0, 5, 7]]).expand(n, L)
    eps = torch.randn(n, L, V, generator=torch.Generator().manual_seed(0))
    S_t = add_noise(ids, eps, torch.full((n,), a))
    S_0 = simplex(ids[:1], V)[0]
    # mean sqrt(alpha_bar) S_0, variance (1 - alpha_bar) k^2, in every coordinate
    torch.testing.assert_close(S_t.mean(0), math.sqrt(a) * S_0, rtol=0, atol=0.15)
    torch.testing.assert_close(S_t.var(0), torch.full((L, V), (1 - a) * K**2), rtol=0.05, atol=0)


def test_renoise_is_the_forward_process_from_the_projected_tokens():
    """Eq. 4 is Eq. 2 applied to the projection: S_{t-1} = sqrt(a) S_hat + sqrt(1 - a) k eps."""
    g = torch.Generator().manual_seed(0)
    eps, tokens, a = torch.randn(2, 5, 32, generator=g), torch.randint(32, (2, 5), generator=g), torch.rand(2)
    S_hat = 2 * K * F.one_hot(tokens, 32).float() - K
    expected = a.sqrt()[:, None, None] * S_hat + (1 - a).sqrt()[:, None, None] * K * eps
    torch.testing.assert_close(renoise(tokens, eps, a), expected, rtol=1e-6, atol=1e-5)


def test_the_deterministic_renoising_uses_the_noise_implied_by_the_prediction():
    """Eq. D1-D2 (METHOD.md §9) written out: eps_hat = (S_t - sqrt(a_t) S_hat) / (sqrt(1 - a_t) k),
    S_{t-1} = sqrt(a_prev) S_hat + sqrt(1 - a_prev) k eps_hat; S_t itself is never changed."""
    g = torch.Generator().manual_seed(1)
    S_t, tokens = 4 * torch.randn(2, 5, 32, generator=g), torch.randint(32, (2, 5), generator=g)
    a_t, a_prev = torch.tensor([0.2, 0.6]), torch.tensor([0.3, 0.9])
    S_hat = 2 * K * F.one_hot(tokens, 32).float() - K
    eps_hat = (S_t - a_t.sqrt()[:, None, None] * S_hat) / ((1 - a_t).sqrt()[:, None, None] * K)
    expected = a_prev.sqrt()[:, None, None] * S_hat + (1 - a_prev).sqrt()[:, None, None] * K * eps_hat
    before = S_t.clone()
    torch.testing.assert_close(renoise_ddim(tokens, S_t, a_t, a_prev), expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(S_t, before)


def test_the_implied_noise_is_the_noise_that_made_s_t_when_the_projection_is_its_token():
    """S_t = forward process of tokens with eps at a_t: re-noised deterministically to a_prev, it is the
    forward process of the same tokens with the same eps (DDIM's eps_hat = eps); from pure noise
    (a_t = 0, the first step) eps_hat = S_t / k whatever the projection."""
    g = torch.Generator().manual_seed(2)
    eps, tokens = torch.randn(3, 4, 16, generator=g), torch.randint(16, (3, 4), generator=g)
    a_t, a_prev = torch.tensor([0.1, 0.5, 0.0]), torch.tensor([0.4, 0.95, 0.2])
    S_t = add_noise(tokens, eps, a_t)
    torch.testing.assert_close(renoise_ddim(tokens, S_t, a_t, a_prev), add_noise(tokens, eps, a_prev),
                               rtol=1e-5, atol=1e-5)
    other = torch.randint(16, (3, 4), generator=g)
    torch.testing.assert_close(renoise_ddim(other, S_t, a_t, a_prev)[2], add_noise(other, S_t / K, a_prev)[2],
                               rtol=1e-5, atol=1e-5)


def test_row_noise_depends_only_on_the_rows_seed():
    alone = row_noise([7], 6, 11)
    batched = row_noise([3, 7, 9], 6, 11)
    assert batched.shape == (3, 6, 11)
    assert torch.equal(alone[0], batched[1])  # same row, whatever else is in the batch
    assert not torch.equal(batched[0], batched[1])
    assert torch.equal(row_noise([3, 7, 9], 6, 11), batched)
    # row b is a fresh generator seeded by seeds[b], filling (L, V): what train.py's data order relies on
    assert torch.equal(batched[2], torch.empty(6, 11).normal_(generator=torch.Generator().manual_seed(9)))
    # row_noise_ fills a buffer from generators that sampling keeps: the first draw is row_noise's
    gens = row_generators([3, 7, 9])
    assert torch.equal(row_noise_(torch.empty(3, 6, 11), gens), batched)
    assert not torch.equal(row_noise_(torch.empty(3, 6, 11), gens), batched)  # then the streams go on
    # it is standard normal noise
    big = row_noise([0, 1], 100, 500)
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


# -----------------------------------------------------------------------------
# What the network sees (§4)


def test_predict_matches_the_spec_written_out(model):
    ids, span, S, t = batch()
    with torch.no_grad():
        torch.testing.assert_close(predict(model, ids, span, S, t), reference_predict(model, ids, span, S, t),
                                   rtol=1e-5, atol=1e-5)
        prev = 3 * torch.randn_like(S)
        torch.testing.assert_close(predict(model, ids, span, S, t, prev),
                                   reference_predict(model, ids, span, S, t, prev), rtol=1e-5, atol=1e-5)


def test_context_tokens_are_read_clean_not_from_the_simplex(model):
    ids, span, S, t = batch()
    with torch.no_grad():
        base = predict(model, ids, span, S, t)
        other_S = torch.where(span[..., None], S, 100 * torch.randn_like(S))  # new values at context only
        assert torch.equal(predict(model, ids, span, other_S, t), base)
        other_ids = ids.clone()
        other_ids[~span] = (ids[~span] + 1) % 512  # the context tokens themselves are read
        assert not torch.allclose(predict(model, other_ids, span, S, t), base)


def test_span_tokens_are_hidden_the_model_sees_only_their_noisy_simplex(model):
    ids, span, S, t = batch()
    with torch.no_grad():
        base = predict(model, ids, span, S, t)
        other_ids = torch.where(span, (ids + 1) % 512, ids)
        assert torch.equal(predict(model, other_ids, span, S, t), base)


def test_attention_is_bidirectional_a_late_span_position_changes_earlier_logits(model):
    ids, span, S, t = batch()
    assert span[:, -1].all()
    with torch.no_grad():
        base = predict(model, ids, span, S, t)
        S2 = S.clone()
        S2[:, -1] = K * torch.randn_like(S2[:, -1])  # only the last position's simplex
        changed = predict(model, ids, span, S2, t)
    # every position from 1 on sees the last one (a causal model would change only logits[:, -1])
    assert ((changed - base).abs().amax(-1)[:, 1:] > 1e-6).all()


def test_logits_at_position_zero_are_exactly_zero_the_label_shift(model):
    ids, span, S, t = batch()
    with torch.no_grad():
        logits = predict(model, ids, span, S, t)
        assert logits.shape == S.shape
        assert torch.equal(logits[:, 0], torch.zeros_like(logits[:, 0]))
        # position j's logits come from position j-1 of the network's output
        h = torch.where(span[..., None], (torch.softmax(S, -1) + 1 / 512) / 2 @ model.embed_tokens.weight
                        + t[:, None, None] * model.timestep_embed.weight[:, 0], model.embed_tokens(ids))
        torch.testing.assert_close(logits[:, 1:], model(embeds=h, causal=False)[:, :-1], rtol=1e-5, atol=1e-5)


def test_no_previous_prediction_means_uniform_self_conditioning(model):
    ids, span, S, t = batch()
    with torch.no_grad():
        none = predict(model, ids, span, S, t, prev_logits=None)
        torch.testing.assert_close(predict(model, ids, span, S, t, prev_logits=torch.zeros_like(S)), none,
                                   rtol=1e-6, atol=1e-6)
        # a constant shift of the logits is the same distribution
        torch.testing.assert_close(predict(model, ids, span, S, t, prev_logits=torch.full_like(S, 4.0)), none,
                                   rtol=1e-6, atol=1e-6)
        # and a real previous prediction is read
        assert not torch.allclose(predict(model, ids, span, S, t, prev_logits=10 * torch.randn_like(S)), none)


def test_timestep_enters_only_through_the_timestep_embedding():
    ids, span, S, t = batch()
    m = tiny(timestep_scale=1.0).eval()
    with torch.no_grad():
        assert not torch.allclose(predict(m, ids, span, S, t), predict(m, ids, span, S, 1 - t))
        m.timestep_embed.weight.zero_()  # as adaptation starts: the AR model's function, t is ignored
        assert torch.equal(predict(m, ids, span, S, t), predict(m, ids, span, S, 1 - t))


def test_timestep_is_added_on_span_positions_only():
    ids, _, S, t = batch()
    m = tiny(timestep_scale=1.0).eval()
    all_context = torch.zeros_like(ids, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(predict(m, ids, all_context, S, t), predict(m, ids, all_context, S, 1 - t))
        # and with no span the model is the plain bidirectional LM on the clean tokens, shifted
        plain = m(ids, causal=False)
        torch.testing.assert_close(predict(m, ids, all_context, S, t)[:, 1:], plain[:, :-1], rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# Loss (Eq. 3) and self-conditioning in training (Sec. 3.1)


def reference_loss(model, ids, span, t, eps, self_condition):
    """§3, 5, 6 by hand: S_t from Eq. 2, prev_logits at t' = min(t + 1, T - 1) with the same eps
    (detached), cross-entropy on span positions j >= 1, averaged."""
    V = eps.shape[-1]
    S_0 = 2 * K * F.one_hot(ids, V).float() - K

    def noisy(tt):
        a = torch.tensor(alpha_bar_formula(tt.numpy() / T), dtype=torch.float32)[:, None, None]
        return a.sqrt() * S_0 + (1 - a).sqrt() * K * eps

    prev = None
    if self_condition:
        t1 = (t + 1).clamp(max=T - 1)
        prev = reference_predict(model, ids, span, noisy(t1), t1.float() / T).detach()
    logits = reference_predict(model, ids, span, noisy(t), t.float() / T, prev)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]  # (B, L)
    counted = span.clone()
    counted[:, 0] = False  # logits[:, 0] predicts nothing
    return -(logp * counted).sum() / counted.sum()


@pytest.mark.parametrize("self_condition", [False, True])
def test_diffusion_loss_is_cross_entropy_on_span_positions(model, self_condition):
    ids, span, _, _ = batch()
    span[:, 0] = True  # even if position 0 is marked span, it is not a target
    t = torch.tensor([0, T - 1])  # t + 1 is clamped to T - 1 for the second row
    eps = torch.randn(*ids.shape, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = diffusion_loss(model, ids, span, t=t, eps=eps, self_condition=self_condition)
        expected = reference_loss(model, ids, span, t, eps, self_condition)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert abs(loss.item() - math.log(512)) < 0.5  # a random model is close to uniform


def test_each_rows_coin_decides_its_own_self_conditioning(model):
    """A (B,) coin: row b's loss is the hand-written one with self-conditioning iff its coin is up (a
    row without it sees prev_logits = 0, uniform), whatever the other rows' coins are."""
    ids, span, _, _ = batch(B=3)  # rows 0 and 2 share a span layout, row 1 has one more position
    t, eps = torch.tensor([30, 2500, 4000]), torch.randn(*ids.shape, 512, generator=torch.Generator().manual_seed(5))
    counted = span.clone()
    counted[:, 0] = False
    for coins in ([True, False, True], [False, True, False]):
        with torch.no_grad():
            total, count = diffusion_loss(model, ids, span, t=t, eps=eps, self_condition=torch.tensor(coins),
                                          reduction="sum")
            by_hand = sum(reference_loss(model, ids[b:b + 1], span[b:b + 1], t[b:b + 1], eps[b:b + 1], coins[b])
                          * counted[b].sum() for b in range(3))
        assert count.item() == counted.sum().item()
        torch.testing.assert_close(total, by_hand, rtol=1e-5, atol=1e-4)


def test_self_conditioning_changes_the_loss(model):
    ids, span, _, _ = batch()
    t, eps = torch.tensor([100, 2000]), torch.randn(*ids.shape, 512)
    with torch.no_grad():
        off = diffusion_loss(model, ids, span, t=t, eps=eps, self_condition=False)
        on = diffusion_loss(model, ids, span, t=t, eps=eps, self_condition=True)
    assert off.item() != on.item()


def test_sum_reduction_gives_sum_and_count_for_global_normalisation(model):
    ids, span, _, _ = batch()
    span[:, 0] = True
    kw = dict(t=torch.tensor([10, 4000]), eps=torch.randn(*ids.shape, 512), self_condition=True)
    with torch.no_grad():
        mean = diffusion_loss(model, ids, span, **kw)
        total, count = diffusion_loss(model, ids, span, reduction="sum", **kw)
    assert count.item() == span[:, 1:].sum().item()  # span positions j >= 1
    torch.testing.assert_close(total / count, mean)


def test_gradient_flows_only_through_the_final_pass():
    m = tiny(timestep_scale=0.1)
    ids, span, _, _ = batch()
    t, eps = torch.tensor([7, 3000]), torch.randn(*ids.shape, 512, generator=torch.Generator().manual_seed(3))

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    # the self-conditioning pass runs without gradient: record grad mode at each model call
    modes = []
    hook = m.model.norm.register_forward_pre_hook(lambda mod, args: modes.append(torch.is_grad_enabled()))
    g = grads(diffusion_loss(m, ids, span, t=t, eps=eps, self_condition=True))
    hook.remove()
    assert modes == [False, True]
    # the same gradients as by hand with prev_logits detached ...
    g_ref = grads(reference_loss(m, ids, span, t, eps, self_condition=True))
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)

    # ... and not those of backpropagating through the previous prediction (the check has power)
    def through_prev():
        S = lambda tt: add_noise(ids, eps, alpha_bars(T)[tt])
        prev = predict(m, ids, span, S(t + 1), (t + 1) / T)  # not detached
        logits = predict(m, ids, span, S(t), t / T, prev)
        return F.cross_entropy(logits[:, 1:][span[:, 1:]], ids[:, 1:][span[:, 1:]])
    g_wrong = grads(through_prev())
    assert not torch.allclose(g["model.embed_tokens.weight"], g_wrong["model.embed_tokens.weight"])


def test_the_span_path_gives_the_embedding_no_gradient():
    """The released model reads E through `.data` for h = p @ E: E learns from context positions and the
    LM head only. With every position a span and an untied head, E gets no gradient at all."""
    m = tiny(timestep_scale=0.1)
    ids, _, _, _ = batch()
    span = torch.ones_like(ids, dtype=torch.bool)
    t, eps = torch.tensor([7, 3000]), torch.randn(*ids.shape, 512)
    diffusion_loss(m, ids, span, t=t, eps=eps, self_condition=False).backward()
    E_grad = m.embed_tokens.weight.grad
    assert E_grad is None or torch.equal(E_grad, torch.zeros_like(E_grad))
    assert m.lm_head.weight.grad.abs().sum() > 0
    # with context positions, E learns from exactly those rows
    m.zero_grad()
    span[:, :4] = False
    diffusion_loss(m, ids, span, t=t, eps=eps, self_condition=False).backward()
    rows = m.embed_tokens.weight.grad.abs().sum(-1) > 0  # (V,)
    assert set(rows.nonzero().flatten().tolist()) == set(ids[:, :4].flatten().tolist())


def test_self_conditioning_keeps_no_graph_for_its_extra_pass():
    m = tiny(timestep_scale=0.1)
    ids, span, _, _ = batch()
    t, eps = torch.tensor([7, 3000]), torch.randn(*ids.shape, 512)

    def saved_for_backward(self_condition):
        count = [0]

        def pack(x):
            count[0] += 1
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            diffusion_loss(m, ids, span, t=t, eps=eps, self_condition=self_condition)
        return count[0]
    # the activations kept for backward are those of one pass, with or without self-conditioning
    assert saved_for_backward(True) == saved_for_backward(False) > 0


# -----------------------------------------------------------------------------
# Masks (§7)


def runs(mask):
    """The (start, length) of each run of True in a 1-D bool mask."""
    m = mask.int().tolist()
    out, start = [], None
    for i, v in enumerate(m + [0]):
        if v and start is None:
            start = i
        if not v and start is not None:
            out.append((start, i - start))
            start = None
    return out


def test_random_segmentation_splits_into_nonempty_parts_that_sum_to_the_total():
    g = torch.Generator().manual_seed(0)
    for n, s in [(1, 1), (10, 1), (10, 10), (10, 3), (512, 25), (76, 9)]:
        for _ in range(20):
            parts = random_segmentation(n, s, g)
            assert len(parts) == s and (parts >= 1).all() and parts.sum().item() == n


@pytest.mark.parametrize("density,mean_len", [(0.15, 3), (0.15, 8), (0.5, 3), (0.5, 8), (0.5, 48)])
def test_t5_span_mask_masks_the_ratio_in_spans_of_the_mean_length(density, mean_len):
    L, draws = 512, 200
    g = torch.Generator().manual_seed(0)
    num_mask = int(L * density)
    lengths = []
    for _ in range(draws):
        mask = t5_span_mask(L, density, mean_len, g)
        assert mask.shape == (L,) and mask.dtype == torch.bool
        assert mask.sum().item() == num_mask
        assert not mask[0]  # BOS is never in the span
        spans = runs(mask)
        # num_mask / mean_len separate spans, each followed by at least one context token or the end
        assert len(spans) == max(1, int(num_mask / mean_len))
        lengths += [n for _, n in spans]
    assert np.mean(lengths) == pytest.approx(mean_len, rel=0.1)
    # spans land anywhere after BOS, not always in the same place
    assert len({tuple(t5_span_mask(L, density, mean_len, g).nonzero().flatten().tolist()) for _ in range(5)}) == 5


def test_t5_span_mask_on_tiny_lengths():
    g = torch.Generator().manual_seed(0)
    for L in (2, 3, 5):
        for density in (0.01, 0.5, 0.99):
            mask = t5_span_mask(L, density, 3, g)
            assert 1 <= mask.sum() <= L - 1 and not mask[0]


def test_prefix_mask_makes_the_tail_the_span_and_refuses_bad_lengths():
    assert prefix_mask(6, 2).tolist() == [False, False, True, True, True, True]
    assert prefix_mask(6, 5).tolist() == [False] * 5 + [True]
    for bad in (-1, 0, 6, 7):
        with pytest.raises(ValueError, match="prefix length"):
            prefix_mask(6, bad)


def classify(mask):
    """Which UL2 objective made a mask (at L = 512): (kind, detail)."""
    L, n, spans = len(mask), int(mask.sum()), runs(mask)
    if len(spans) == 1 and spans[0][0] + spans[0][1] == L:
        return "prefix", spans[0][0]  # prefix length
    assert n in (int(L * 0.15), int(L * 0.5)), n
    return ("t5" if n == int(L * 0.15) else "aggressive"), len(spans)


def test_ul2_mask_mixes_three_objectives_equally():
    L, draws = 512, 1500
    g = torch.Generator().manual_seed(0)
    kinds = {"t5": [], "prefix": [], "aggressive": []}
    for _ in range(draws):
        mask = ul2_mask(L, g)
        assert not mask[0]
        kind, detail = classify(mask)
        kinds[kind].append(detail)
    for kind, details in kinds.items():
        assert abs(len(details) / draws - 1 / 3) < 0.05, kind
    # T5 picks mean span 3 or 8 (25 or 9 spans at 15%), aggressive 3, 8 or 48 (85, 32, 5 spans), equally
    for kind, options in [("t5", {25, 9}), ("aggressive", {85, 32, 5})]:
        d = kinds[kind]
        assert set(d) == options
        for o in options:
            assert abs(d.count(o) / len(d) - 1 / len(options)) < 0.08, (kind, o)
    # released prefix-LM: BOS + n context tokens, n in [1, (L - 1) // 2)
    assert 2 <= min(kinds["prefix"]) and max(kinds["prefix"]) <= (L - 1) // 2


def test_ul2_mask_draws_its_objective_first_in_the_documented_order():
    """The first draw of the generator picks the objective, randint(3): 0 T5, 1 aggressive T5, 2
    prefix-LM (App. A.1's order), so a seed maps to the same objective in every version."""
    for seed in range(40):
        expected = ["t5", "aggressive", "prefix"][int(torch.randint(3, (), generator=torch.Generator().manual_seed(seed)))]
        assert classify(ul2_mask(512, torch.Generator().manual_seed(seed)))[0] == expected, seed


def test_ul2_released_prefix_is_bos_plus_one_to_half_the_length():
    L = 64  # here prefix masks (34..63 span tokens) are told apart from T5 (9) and aggressive (32)
    g = torch.Generator().manual_seed(0)
    prefixes = set()
    for _ in range(1500):
        mask = ul2_mask(L, g, prefix="released")
        if mask.sum() > 32:
            (start, n), = runs(mask)
            assert start + n == L
            prefixes.add(start)
    # BOS + n tokens of context, n in [1, (L-1)//2) as in the released gpt_span_mask
    assert prefixes == set(range(2, (L - 1) // 2 + 1))


def test_ul2_paper_prefix_is_the_first_half():
    L = 512
    g = torch.Generator().manual_seed(0)
    seen = 0
    for _ in range(60):
        kind, detail = classify(ul2_mask(L, g, prefix="paper"))
        if kind == "prefix":
            assert detail == L // 2
            seen += 1
    assert seen > 0


def test_ul2_mask_refuses_an_unknown_prefix_mode():
    for seed in range(10):  # whichever objective the draw picks
        with pytest.raises(ValueError, match="prefix"):
            ul2_mask(64, torch.Generator().manual_seed(seed), prefix="halfway")


def test_masks_are_determined_by_the_generator_seed():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([ul2_mask(256, g) for _ in range(20)] + [t5_span_mask(256, 0.15, 3, g)])
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


# -----------------------------------------------------------------------------
# Projection (Eq. 5)


# -----------------------------------------------------------------------------
# The projection (Eq. 5): argmax, or nucleus sampling by the sort-based definition
# (support/fused_sampling.project_fast, its fast twin, is tested equal in tests/test_fused_sampling.py)


def test_project_without_top_p_is_the_argmax_and_keeps_the_leading_shape():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tess2.project(logits), logits.argmax(-1))
    assert tess2.project(logits, 0.9, torch.Generator().manual_seed(1)).shape == (2, 3)
    assert tess2.project(logits[0, 0], 0.9, torch.Generator().manual_seed(1)).shape == ()


def test_project_draws_from_the_kept_prefix_by_the_inverse_cdf_in_sorted_order():
    """p = (0.5, 0.3, 0.15, 0.05) in a shuffled order, top_p 0.7: the mass before each sorted entry is
    0, 0.5, 0.8, 0.95, so the first two are kept (mass 0.8); one uniform u per position draws the
    most probable token if u * 0.8 < 0.5, else the second. The generator gives each position one
    draw, in order."""
    p = torch.tensor([0.15, 0.5, 0.05, 0.3])
    n = 4000
    tokens = tess2.project(p.log().expand(n, 4), 0.7, torch.Generator().manual_seed(2))
    u = torch.rand(n, generator=torch.Generator().manual_seed(2))
    assert torch.equal(tokens, torch.where(u * 0.8 < 0.5, 1, 3))
    assert 0.55 < (tokens == 1).float().mean() < 0.7  # 0.5 / 0.8 = 0.625
    assert torch.equal(tess2.project(p.log(), 0.3, torch.Generator().manual_seed(3)), torch.tensor(1))  # only 0.5
    assert set(tess2.project(p.log().expand(n, 4), 1.0, torch.Generator().manual_seed(4)).tolist()) == {0, 1, 2, 3}


def test_project_never_draws_a_token_of_probability_zero_and_depends_on_the_seed():
    logits = torch.randn(5000, 30, generator=torch.Generator().manual_seed(5))
    logits[:, 20:] = -math.inf
    tokens = tess2.project(logits, 1.0, torch.Generator().manual_seed(6))
    assert tokens.max() < 20
    assert torch.equal(tokens, tess2.project(logits, 1.0, torch.Generator().manual_seed(6)))
    assert not torch.equal(tokens, tess2.project(logits, 1.0, torch.Generator().manual_seed(7)))


# -----------------------------------------------------------------------------
# The loss is learnable


def test_a_tiny_model_learns_a_fixed_batch():
    m = tiny(timestep_scale=0.0)
    B, L, V = 4, 64, 512
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(V, (B, L), generator=g)
    span = torch.stack([ul2_mask(L, g) for _ in range(B)])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        t, eps = torch.randint(T, (B,), generator=g), torch.randn(B, L, V, generator=g)
        loss = diffusion_loss(m, ids, span, t, eps, self_condition=bool(torch.rand((), generator=g) < 0.5))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), abs=0.3)
    assert np.mean(losses[-10:]) < 0.3 * losses[0]


# -----------------------------------------------------------------------------
# The checkpoint's config flags in predict (§4): is_causal, self_condition, mix before weights,
# disable_timestep_embed, each against the formula written out


def flagged(**flags):
    torch.manual_seed(0)
    m = Transformer(preset("tiny", **{"timestep_embed": True, "causal": False, **flags})).init_weights().eval()
    if m.args.timestep_embed:
        with torch.no_grad():
            m.timestep_embed.weight.normal_()
    return m


def test_is_causal_true_runs_the_diffusion_model_causally():
    m = flagged(causal=True)
    ids, span, S, t = batch()
    prev = 3 * torch.randn_like(S)
    with torch.no_grad():
        E, W_t = m.embed_tokens.weight, m.timestep_embed.weight[:, 0]
        p = (torch.softmax(S, -1) + torch.softmax(prev, -1)) / 2
        h = torch.where(span[..., None], p @ E + t[:, None, None] * W_t, E[ids])
        logits = m(embeds=h, causal=True)
        expected = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)
        torch.testing.assert_close(predict(m, ids, span, S, t, prev), expected, rtol=1e-5, atol=1e-5)
        S2 = S.clone()
        S2[:, -1] += 10 * torch.randn_like(S2[:, -1])  # a causal model: the last position changes nothing earlier
        assert torch.equal(predict(m, ids, span, S2, t, prev)[:, :-1], predict(m, ids, span, S, t, prev)[:, :-1])


@pytest.mark.parametrize("flags", [dict(self_condition=None), dict(self_condition_mix_before_weights=False)])
def test_without_self_conditioning_the_previous_prediction_is_not_read(flags):
    """self_condition null, or (as in the released forward) mixing after the weights: p = softmax(S_t)."""
    m = flagged(**flags)
    ids, span, S, t = batch()
    with torch.no_grad():
        E, W_t = m.embed_tokens.weight, m.timestep_embed.weight[:, 0]
        h = torch.where(span[..., None], torch.softmax(S, -1) @ E + t[:, None, None] * W_t, E[ids])
        logits = m(embeds=h, causal=False)
        expected = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)
        for prev in (None, 5 * torch.randn_like(S)):
            torch.testing.assert_close(predict(m, ids, span, S, t, prev), expected, rtol=1e-5, atol=1e-5)


def test_disable_timestep_embed_gives_a_model_without_a_timestep_term():
    cfg = {**Transformer(preset("tiny", timestep_embed=True, causal=False)).args.to_hf(),
           "architectures": ["MistralForDiffusionLM"], "disable_timestep_embed": True}
    cfg.pop("timestep_embed")
    from model import ModelArgs
    args = ModelArgs.from_hf(cfg)
    assert not args.timestep_embed
    torch.manual_seed(0)
    m = Transformer(args).init_weights().eval()
    ids, span, S, t = batch()
    with torch.no_grad():
        E = m.embed_tokens.weight
        p = (torch.softmax(S, -1) + 1 / 512) / 2
        logits = m(embeds=torch.where(span[..., None], p @ E, E[ids]), causal=False)
        expected = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)
        torch.testing.assert_close(predict(m, ids, span, S, t), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(predict(m, ids, span, S, t), predict(m, ids, span, S, 1 - t))


# -----------------------------------------------------------------------------
# Reward guidance (§10, Eq. 9-11) against the update written out


def tiny_rm(seed=1):
    torch.manual_seed(seed)
    return Transformer(preset("tiny", head="score")).init_weights().eval()


def literal_guidance_step(rm, x, ids, span, eta, tau):
    """x + eta * d/dx R(softmax(x / tau) @ E_rm at span, E_rm[w] at context), by autograd on the formula."""
    x = x.detach().float().requires_grad_(True)
    E = rm.embed_tokens.weight.detach()
    h = torch.where(span[..., None], torch.softmax(x / tau, -1) @ E, E[ids])
    (g,) = torch.autograd.grad(rm(embeds=h, causal=True).sum(), x)
    return (x + eta * g).detach()


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_one_guidance_step_is_gradient_ascent_on_the_reward_with_tau_dividing(tau):
    rm = tiny_rm()
    ids, span, _, _ = batch()
    x = 3 * torch.randn(*ids.shape, 512, generator=torch.Generator().manual_seed(4))
    before = x.clone()
    out = tess2.reward_guidance(rm, x, ids, span, eta=0.5, tau=tau)
    torch.testing.assert_close(out, literal_guidance_step(rm, x, ids, span, 0.5, tau), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, before)  # the caller's logits are not modified
    assert torch.equal(out[~span], x[~span])  # no gradient reaches context positions
    if tau != 1.0:  # tau matters (and divides: a product would give another update)
        assert not torch.allclose(out, literal_guidance_step(rm, x, ids, span, 0.5, 1.0))


def test_several_guidance_steps_are_plain_gradient_ascent():
    rm = tiny_rm()
    ids, span, _, _ = batch()
    x = 3 * torch.randn(*ids.shape, 512, generator=torch.Generator().manual_seed(5))
    y = x
    for _ in range(3):
        y = literal_guidance_step(rm, y, ids, span, 0.3, 1.0)
    torch.testing.assert_close(tess2.reward_guidance(rm, x, ids, span, eta=0.3, steps=3), y, rtol=1e-4, atol=1e-5)


def test_guidance_updates_bf16_logits_in_fp32():
    """In bf16 most of eta * grad is below the resolution of x: the update must be made in fp32."""
    rm = tiny_rm()
    ids, span, _, _ = batch()
    x = (3 * torch.randn(*ids.shape, 512, generator=torch.Generator().manual_seed(6))).bfloat16()
    out = tess2.reward_guidance(rm, x, ids, span, eta=0.01)
    assert out.dtype == torch.float32
    changed = (out != x.float())[span].float().mean()
    expected = literal_guidance_step(rm, x.float(), ids, span, 0.01, 1.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    in_bf16 = ((x + (expected - x.float()).bfloat16()) != x)[span].float().mean()  # the update made in bf16
    assert changed > 0.3 and in_bf16 < changed / 4  # in bf16 arithmetic most of the update is lost
