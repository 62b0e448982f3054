"""
support/fused_loss.py: the span-only training loss is tess2.diffusion_loss, value and gradients,
whatever its chunk of rows; both are the loss written out by hand (METHOD.md §1-6), each row with
or without self-conditioning as its coin says; the chunk is sized for the device, and under
autocast each (V, D) weight is cast once per call.
"""
import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import tess2
from model import Transformer, preset
from support import fused_loss

TIGHT = dict(atol=1e-5, rtol=1e-5)


def tiny_batch(tied=False):
    """A tiny diffusion model (V 61, D 64) and 3 rows of 12 with span positions, timesteps and noise seeds;
    row 2 has one target."""
    torch.manual_seed(0)
    net = Transformer(preset("tiny", vocab_size=61, timestep_embed=True, causal=False,
                             tie_word_embeddings=tied)).init_weights()
    nn.init.normal_(net.timestep_embed.weight)  # a trained model's: its gradient then reaches everything
    B, L = 3, 12
    ids = torch.randint(3, 60, (B, L))
    span = torch.rand(B, L) < 0.6
    span[:, 0], span[2, 1:] = False, False
    span[2, 7] = True  # row 2 has one target: its weight differs most between the weightings
    return net, ids, span, torch.tensor([10, 2500, 4999]), [5, 6, 7]


def chunks_of(monkeypatch, rows):
    """fused_loss.diffusion_loss cuts its span positions into chunks of `rows` (on this CPU)."""
    monkeypatch.setattr(fused_loss, "chunk_rows", lambda vocab_size, device: rows)


# -----------------------------------------------------------------------------
# the twin of tess2.diffusion_loss


def test_self_conditioning_per_row_is_each_row_alone():
    """A (B,) coin: self-conditioned rows get the t+1 prediction, the others prev_logits = 0 (uniform),
    exactly as if each row were its own batch with a bool coin."""
    torch.manual_seed(0)
    net = Transformer(preset("tiny", vocab_size=61, timestep_embed=True, causal=False)).init_weights()
    ids = torch.randint(3, 60, (3, 10))
    span = torch.rand(3, 10) < 0.6
    span[:, 0], span[:, 5] = False, True
    t, eps = torch.tensor([10, 2500, 4999]), torch.randn(3, 10, 61)
    coin = torch.tensor([True, False, True])
    with torch.no_grad():
        sums, counts = tess2.diffusion_loss(net, ids, span, t=t, eps=eps, self_condition=coin, reduction="none")
        for i in range(3):
            alone = tess2.diffusion_loss(net, ids[i:i + 1], span[i:i + 1], t=t[i:i + 1], eps=eps[i:i + 1],
                                         self_condition=bool(coin[i]))
            assert_close(sums[i] / counts[i], alone, **TIGHT)
            assert counts[i] == span[i, 1:].sum()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("coin", [False, True, "per row", "extra pass"])
@pytest.mark.parametrize("weighting", ["sequence", "token"])
def test_the_span_only_loss_has_the_plain_loss_and_gradients(coin, weighting, tied, monkeypatch):
    """fused_loss.diffusion_loss, which makes the head's logits, the cross-entropy and p @ E at span
    positions only and in chunks (here 4 rows, so several), has tess2.diffusion_loss's value and
    every parameter's gradient, with or without self-conditioning, per-row coins, both weightings."""
    net, ids, span, t, seeds = tiny_batch(tied)
    B, L = ids.shape
    sc = {"per row": torch.tensor([True, False, True]), "extra pass": False}.get(coin, coin)
    sums, counts = tess2.diffusion_loss(net, ids, span, t=t, eps=tess2.row_noise(seeds, L, 61), self_condition=sc,
                                        reduction="none")
    plain = (sums / counts.clamp(min=1)).sum() if weighting == "sequence" else sums.sum()
    grads = torch.autograd.grad(plain, list(net.parameters()))
    weights = 1 / counts.clamp(min=1) if weighting == "sequence" else torch.ones(B)
    chunks_of(monkeypatch, 4)
    loss = fused_loss.diffusion_loss(net, ids, span, t, seeds, sc, weights, extra_pass=coin == "extra pass")
    assert_close(loss, plain, atol=1e-6, rtol=1e-6)
    for (name, p), g in zip(net.named_parameters(), grads):
        assert_close(torch.autograd.grad(loss, p, retain_graph=True)[0], g, atol=1e-6, rtol=1e-5, msg=name)


def test_more_span_positions_than_hidden_units_are_all_counted(monkeypatch):
    """N = 184 span positions, more than D = 64 (a loop bounded by the wrong dimension of h would stop
    early): the loss and the head's gradient are still the plain loss's."""
    torch.manual_seed(1)
    net = Transformer(preset("tiny", vocab_size=61, timestep_embed=True, causal=False)).init_weights()
    B, L = 8, 24
    ids, span = torch.randint(3, 60, (B, L)), torch.ones(B, L, dtype=torch.bool)
    span[:, 0] = False
    t, seeds = torch.arange(B) * 600, list(range(B))
    sums, _ = tess2.diffusion_loss(net, ids, span, t=t, eps=tess2.row_noise(seeds, L, 61), reduction="none")
    chunks_of(monkeypatch, 16)
    loss = fused_loss.diffusion_loss(net, ids, span, t, seeds, False, torch.ones(B))
    assert_close(loss, sums.sum(), atol=1e-5, rtol=1e-6)
    assert_close(torch.autograd.grad(loss, net.lm_head.weight)[0],
                 torch.autograd.grad(sums.sum(), net.lm_head.weight)[0], atol=1e-6, rtol=1e-5)


def test_the_gradients_scale_with_the_gradient_of_the_loss(monkeypatch):
    """train.py backpropagates loss / count, not the loss: the gradients computed in the forward are
    scaled by the incoming gradient, for the head and for everything below it."""
    net, ids, span, t, seeds = tiny_batch()
    chunks_of(monkeypatch, 4)
    params = [net.lm_head.weight, net.model.layers[0].mlp.up_proj.weight]
    loss = fused_loss.diffusion_loss(net, ids, span, t, seeds, False, torch.ones(len(ids)))
    once = torch.autograd.grad(loss, params, retain_graph=True)
    for g1, g3 in zip(once, torch.autograd.grad(loss / 3, params)):
        assert_close(g3, g1 / 3, atol=1e-7, rtol=1e-5)


# -----------------------------------------------------------------------------
# the chunk of rows


def test_a_chunk_of_logits_is_a_fixed_budget_of_bytes_per_device():
    """One (chunk, V) fp32 block: 16 MiB on a CPU (131 rows at Mistral's V 32001), 512 MiB on CUDA
    (4194 rows), the CPU's budget on any other device, and never under 64 rows."""
    assert fused_loss.chunk_rows(32001, torch.device("cpu")) == 131
    assert fused_loss.chunk_rows(32001, torch.device("cuda", 3)) == 4194  # a device object: no GPU needed
    assert fused_loss.chunk_rows(32001, "cuda") == 4194
    assert fused_loss.chunk_rows(32001, torch.device("mps")) == 131
    assert fused_loss.chunk_rows(61, torch.device("cuda")) == 2200290
    assert fused_loss.chunk_rows(256_000, torch.device("cpu")) == 64  # 16 rows would fit: the floor
    assert fused_loss.chunk_rows(256_000, torch.device("cuda")) == 524


def test_the_loss_asks_for_the_chunk_of_its_rows_device(monkeypatch):
    """diffusion_loss sizes its chunk with chunk_rows for the device its rows are on (so on CUDA it
    gets the CUDA budget above), once per call."""
    asked = []
    chunk_rows = fused_loss.chunk_rows
    monkeypatch.setattr(fused_loss, "chunk_rows", lambda V, device: asked.append((V, device)) or chunk_rows(V, device))
    net, ids, span, t, seeds = tiny_batch()
    fused_loss.diffusion_loss(net, ids, span, t, seeds, True, torch.ones(3))
    assert asked == [(61, torch.device("cpu"))]


@pytest.mark.parametrize("coin", [False, True])
def test_the_loss_and_its_gradients_do_not_depend_on_the_chunk_size(coin, monkeypatch):
    """1 row, 3, 4, 7 or all N span positions per chunk: each pass is cut into ceil(N / chunk) chunks
    and gives tess2.diffusion_loss's value and gradients."""
    net, ids, span, t, seeds = tiny_batch()
    sums, counts = tess2.diffusion_loss(net, ids, span, t=t, eps=tess2.row_noise(seeds, 12, 61), self_condition=coin,
                                        reduction="none")
    plain = (sums / counts.clamp(min=1)).sum()
    grads = torch.autograd.grad(plain, list(net.parameters()))
    N = int(span.sum())
    calls = []
    add_noise = tess2.add_noise
    monkeypatch.setattr(tess2, "add_noise", lambda *a, **kw: calls.append(1) or add_noise(*a, **kw))
    for rows in (1, 3, 4, 7, N):
        chunks_of(monkeypatch, rows)
        calls.clear()
        loss = fused_loss.diffusion_loss(net, ids, span, t, seeds, coin, 1 / counts.clamp(min=1))
        assert len(calls) == (2 if coin else 1) * math.ceil(N / rows), rows  # one add_noise per chunk and pass
        assert_close(loss, plain, atol=1e-6, rtol=1e-6)
        for (name, p), g in zip(net.named_parameters(), grads):
            assert_close(torch.autograd.grad(loss, p, retain_graph=True)[0], g, atol=1e-6, rtol=1e-5, msg=name)


# -----------------------------------------------------------------------------
# under autocast


class WeightCasts(TorchDispatchMode):
    """Counts the copies of a (V, D) tensor into another dtype: autocast makes one of an fp32 weight
    each time it enters a matrix product, unless it was cast already."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape and \
                kwargs.get("dtype", args[0].dtype) != args[0].dtype:
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("tied", [False, True])
def test_under_autocast_each_weight_is_cast_once_per_call(tied, monkeypatch):
    """bf16 autocast, self-conditioning on, chunks of 4 rows (so ~8 chunks per pass): the LM head's W
    and E, fp32 (V, D), are cast to bf16 once per call (one tensor when tied), not once per chunk.
    The loss and W's gradient stay the fp32 ones within bf16's precision; W's gradient stays fp32."""
    net, ids, span, t, seeds = tiny_batch(tied)
    with torch.no_grad():
        reference = fused_loss.diffusion_loss(net, ids, span, t, seeds, True, torch.ones(3))
    chunks_of(monkeypatch, 4)
    casts = WeightCasts(net.lm_head.weight.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16), casts:
        loss = fused_loss.diffusion_loss(net, ids, span, t, seeds, True, torch.ones(3))
    assert casts.count == (1 if tied else 2)
    assert_close(loss, reference, atol=0, rtol=0.02)
    loss.backward()
    assert net.lm_head.weight.grad.dtype == torch.float32 and net.lm_head.weight.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# the per-sequence self-conditioning coin, against the loss written out by hand (METHOD.md §1-6)


def loss_by_hand(net, ids, span, t, seed, coin):
    """One row's mean span cross-entropy, METHOD.md §1-6 written out with the network's pieces only
    (E, the timestep weight W_t, the transformer trunk, the LM head); nothing of tess2 or fused_loss.
    ids, span (L,), t an int in [0, T), seed: eps = N(0, I) (L, V) from a generator seeded with it.
    coin False: prev_logits absent, softmax(prev_logits) = 1/V. coin True: first a pass at
    t' = min(t + 1, T - 1) with the same eps and no previous prediction; its logits are prev_logits."""
    V, T, k = net.args.vocab_size, 5000, 5.0
    L = ids.numel()
    E, W_t = net.model.embed_tokens.weight.detach(), net.timestep_embed.weight[:, 0]  # (V, D), (D,)
    eps = torch.randn(L, V, generator=torch.Generator().manual_seed(seed))  # (L, V)

    def logits_at(step, prev_logits):
        s = step / T  # the scaled time the network is given
        f = lambda x: math.cos((x + 1e-4) / (1 + 1e-4) * math.pi / 2) ** 2  # noqa: E731
        alpha = f(s) / f(0.0)
        S_0 = torch.where(torch.arange(V) == ids[:, None], k, -k)  # (L, V): +k at the token, -k elsewhere
        S_t = math.sqrt(alpha) * S_0 + math.sqrt(1 - alpha) * k * eps
        prev = torch.full((L, V), 1.0 / V) if prev_logits is None else torch.softmax(prev_logits, -1)
        p = (torch.softmax(S_t, -1) + prev) / 2  # (L, V), Eq. 8
        h = torch.where(span[:, None], p @ E + W_t * s, E[ids])  # (L, D): span p @ E + W_t t/T, context E[w]
        hidden = net.hidden_states(embeds=h[None])[0]  # (L, D), bidirectional
        out = torch.zeros(L, V)
        out[1:] = net.lm_head(hidden[:-1])  # logits[j] from the state at j - 1; logits[0] = 0
        return out

    with torch.no_grad():
        prev = logits_at(min(t + 1, T - 1), None) if coin else None
    logits = logits_at(t, prev)
    j = [i for i in range(1, L) if span[i]]  # the targets: span positions j >= 1
    return sum(-torch.log_softmax(logits[i], -1)[ids[i]] for i in j) / len(j)


def test_a_rows_coin_decides_its_loss_as_written_out_by_hand(monkeypatch):
    """Row b with coin False has the one-pass loss (prev_logits = 0, uniform), with coin True the
    two-pass loss (prev_logits = the t+1 prediction), whatever the other rows' coins: fused_loss
    (in chunks) and tess2.diffusion_loss, each against loss_by_hand. E and the LM head are scaled up
    so that the previous prediction is far from uniform and moves the input: the two losses of each
    row differ by over 30x the tolerance (row 2, one target at t = 4999, the least)."""
    net, ids, span, t, seeds = tiny_batch()
    with torch.no_grad():
        net.lm_head.weight.mul_(30.0)
        net.model.embed_tokens.weight.mul_(30.0)
    by_hand = {(b, coin): loss_by_hand(net, ids[b], span[b], int(t[b]), seeds[b], coin)
               for b in range(3) for coin in (False, True)}
    for b in range(3):
        assert (by_hand[b, True] - by_hand[b, False]).abs() > 2e-3, b
    chunks_of(monkeypatch, 4)
    for coins in ([True, False, True], [False, True, False], [False] * 3, [True] * 3):
        coin = torch.tensor(coins)
        with torch.no_grad():
            sums, counts = tess2.diffusion_loss(net, ids, span, t=t, eps=tess2.row_noise(seeds, 12, 61),
                                                self_condition=coin, reduction="none")
        for b in range(3):
            expected = by_hand[b, coins[b]]
            assert_close(sums[b] / counts[b], expected, **TIGHT, msg=f"tess2 row {b}, coins {coins}")
            only_b = (torch.arange(3) == b).float() / counts[b]  # weights: row b's mean alone
            fused = fused_loss.diffusion_loss(net, ids, span, t, seeds, coin, only_b)
            assert_close(fused, expected, **TIGHT, msg=f"fused row {b}, coins {coins}")
