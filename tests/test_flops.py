"""support/flops.py against torch.utils.flop_counter.FlopCounterMode on the real steps of a tiny model.

FlopCounterMode counts matrix products (mm, addmm, bmm, ...) and the CUDA attention kernels; it omits
element-wise work (softmax, log-sum-exp, RMSNorm, RoPE, SiLU, the noise, AdamW), gathers and scatters
(the embedding lookup, the span gather) and CPU's fused attention kernel, which it has no formula for.
So every count here runs under the math SDPA backend, whose attention is two bmm calls forward and
four backward: the counter's bmm total is then the attention alone, compared exactly, and the rest
(mm, addmm) is every other product. Tolerance of the rest: 1e-3 relative. The one product the
formula counts that a step skips is the input gradient of the timestep embedding (t needs none):
2 D FLOPs per token, 128 of about 1e6 per token here (1.3e-4).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tess2
import train
from model import Transformer, preset
from support import flops, fused_loss

B, L = 2, 64


def count(f):
    """(bmm FLOPs, all other FLOPs) of f() under the math attention backend."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        f()
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    bmm = per_op.pop("aten.bmm", 0)
    assert set(per_op) <= {"aten.mm", "aten.addmm"}, per_op  # nothing else is a product here
    return bmm, sum(per_op.values())


def tiny(stage="adapt", **kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", **train.STAGES[stage]["model"], **kw)).init_weights()


def rows(span_mask_rows):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (B, L), generator=g)
    span_mask = torch.stack(span_mask_rows)
    assert not span_mask[:, 0].any()  # BOS is context
    return ids, span_mask, torch.randint(tess2.NUM_TRAIN_STEPS, (B,), generator=g)


def check(parts, bmm, rest):
    tokens = B * L
    assert bmm == parts["attention"] * tokens  # exactly: the same L x L products
    want = sum(v for k, v in parts.items() if k != "attention") * tokens
    assert rest == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("self_condition", [True, False])
def test_training_step_matches_the_flop_counter(self_condition):
    """fused_loss.diffusion_loss forward + backward (train.py's adapt step), self-conditioning pinned:
    the head, the cross-entropy and p @ E only at span positions; a self-conditioning step adds a
    forward pass, p @ E and the head once more."""
    net = tiny()
    t5 = tess2.t5_span_mask(L, 0.5, 3, torch.Generator().manual_seed(2))
    ids, span_mask, t = rows([tess2.prefix_mask(L, 20), t5])
    counts = span_mask[:, 1:].sum(1)

    def step():
        loss = fused_loss.diffusion_loss(net, ids, span_mask, t, [5, 6], self_condition, 1 / counts)
        loss.backward()

    bmm, rest = count(step)
    share = span_mask.sum().item() / (B * L)
    parts = flops.flop_parts(net.args, net.num_params(), L, "adapt", span_fraction=share,
                             self_condition=float(self_condition))
    check(parts, bmm, rest)
    assert parts["head"] > 0 and parts["p_at_E"] > 0


def test_the_span_share_is_what_makes_the_head_cheap():
    """Only span positions pay for the head and p @ E: a row that is half context costs less than an
    all-span row by exactly those parts (a formula that ignored the share would fail here)."""
    net = tiny()
    ids, half, t = rows([tess2.prefix_mask(L, L // 2)] * B)
    counts = half[:, 1:].sum(1)
    bmm, rest = count(lambda: fused_loss.diffusion_loss(net, ids, half, t, [5, 6], True, 1 / counts).backward())
    full = flops.flop_parts(net.args, net.num_params(), L, "adapt", span_fraction=1.0, self_condition=1.0)
    assert rest < 0.95 * sum(v for k, v in full.items() if k != "attention") * B * L
    check(flops.flop_parts(net.args, net.num_params(), L, "adapt", span_fraction=0.5, self_condition=1.0), bmm, rest)


@pytest.mark.parametrize("stage", ["ar", "rm"])
def test_causal_stages_match_the_flop_counter(stage):
    """ar: the head at every position; rm: the score head at the last. Attention over the full L x L."""
    net = tiny(stage)
    ids = torch.randint(3, 512, (B, L), generator=torch.Generator().manual_seed(3))
    objective = train.Objective(net, stage, train.STAGES[stage]["loss_weighting"])
    if stage == "ar":
        b = dict(ids=ids)
    else:
        b = dict(chosen=ids, rejected=ids.flip(1), chosen_last=torch.full((B,), L - 1),
                 rejected_last=torch.full((B,), L - 1))
    bmm, rest = count(lambda: objective(b).backward())
    tokens = 2 if stage == "rm" else 1  # rm reads two sequences per pair, as train.py counts its tokens
    parts = flops.flop_parts(net.args, net.num_params(), L, stage)
    parts = {k: v * tokens for k, v in parts.items()}
    check(parts, bmm, rest)


def test_sampler_step_matches_the_flop_counter():
    """tess2.predict: network, p @ E and the head at every position; guidance (G = 1) with a frozen,
    recomputed reward model as sample.py runs it on CUDA (the recomputation skips the down
    projections), and without recomputation."""
    net = tiny().eval()
    ids, span_mask, _ = rows([tess2.prefix_mask(L, 10)] * B)
    S = 5 * torch.randn(B, L, 512)
    prev = torch.randn(B, L, 512)
    with torch.no_grad():
        bmm, rest = count(lambda: tess2.predict(net, ids, span_mask, S, torch.full((B,), 0.3), prev))
    check(flops.flop_parts(net.args, net.num_params(), L, "sample"), bmm, rest)

    rm = Transformer(preset("tiny", head="score", num_hidden_layers=1)).init_weights().requires_grad_(False)
    for recompute in (True, False):
        rm.gradient_checkpointing = recompute
        bmm, rest = count(lambda: tess2.reward_guidance(rm, prev, ids, span_mask, eta=0.25))
        parts = flops.flop_parts(net.args, net.num_params(), L, "sample", reward=(rm.args, rm.num_params()),
                                 recompute=recompute)
        attention = flops.attention_flops(rm.args, L) * (4 if recompute else 3)  # fwd, 2x bwd, recomputed
        assert bmm == attention * B * L
        assert rest == pytest.approx((parts["guidance"] - attention) * B * L, rel=1e-3)


def test_ul2_span_share_is_the_masks_mean():
    """The expected span share against the mean over 3000 masks drawn by tess2.ul2_mask (its
    standard error is about 0.005 here)."""
    g = torch.Generator().manual_seed(0)
    for length in (64, 200):
        drawn = torch.stack([tess2.ul2_mask(length, g) for _ in range(3000)]).float().mean().item()
        assert flops.ul2_span_share(length) == pytest.approx(drawn, abs=0.02)
    assert flops.ul2_span_share(2048) == pytest.approx((307 + 1024 + (2047 - 511.5)) / (3 * 2048))


def test_the_paper_shape_arithmetic():
    """The figures BENCHMARKS.md states: a sampler step at 8 x 2048 on the released 7B is 2.549e14
    FLOPs, 32.3 s per 100 steps at 790 TFLOP/s; guided (G = 1) 0.958e15 with the reward model's blocks
    recomputed (1.02e15 if the down projections were recomputed too), 0.774e15 without recomputation.
    The head and p @ E are a fixed cost per token: a larger share of 4 layers than of 32."""
    def meta(name, layers, **kw):
        with torch.device("meta"):
            net = Transformer(preset(name, num_hidden_layers=layers, **kw))
        return net.args, net.num_params()

    args, n = meta("tess2-7b", 32)
    rm = meta("mistral-7b", 32, vocab_size=32001, head="score")
    step = flops.flops_per_token(args, n, 2048, "sample") * 8 * 2048
    assert step == pytest.approx(2.549e14, rel=1e-3)
    assert 100 * step / 790e12 == pytest.approx(32.3, abs=0.05)
    assert flops.flops_per_token(args, n, 2048, "sample", reward=rm) * 8 * 2048 == pytest.approx(0.958e15, rel=1e-3)
    assert flops.flops_per_token(args, n, 2048, "sample", reward=rm, recompute=False) * 8 * 2048 == pytest.approx(
        0.774e15, rel=1e-3)
    four = flops.fixed_share(flops.flop_parts(*meta("tess2-7b", 4), 2048, "adapt"))
    thirty_two = flops.fixed_share(flops.flop_parts(args, n, 2048, "adapt"))
    assert 0.07 < four < 0.10 and 0.009 < thirty_two < 0.013


def test_bad_stage_is_refused():
    with pytest.raises(ValueError, match="stage must be one of"):
        flops.flops_per_token(tiny().args, 1, L, "pretrain")
