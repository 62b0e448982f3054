"""
TESS 2: simplex diffusion over a language model's vocabulary, equation by equation.

Each function is one step of the method as METHOD.md describes it (section numbers there, "§n")
and cites the paper's equation (Tae, Ivison, Kumar and Cohan, "TESS 2: A Large-Scale Generalist
Diffusion Language Model", arXiv:2502.13917). These are the plain statements of the formulas; training
(train.py), sampling (sample.py) and evaluation (eval/) share them. Where a loop needs a faster or
smaller version of one, it is a named twin in support/ (fused_loss.py, fused_sampling.py) whose
docstring names the definition here, and a test proves the two equal.

Notation: V vocabulary, D hidden size, k simplex value, T training timesteps, N inference steps,
B batch, L length. "span" positions are generated (span_mask True), "context" positions are
given as clean tokens.
"""
import math

import torch
import torch.nn.functional as F

SIMPLEX_VALUE = 5.0  # k
NUM_TRAIN_STEPS = 5000  # T


# -----------------------------------------------------------------------------
# Noise schedule (§2): cosine, "squaredcos_improved_ddpm"


def alpha_bar(s):
    """alpha_bar(s) = f(s) / f(0), f(s) = cos^2(((s + 1e-4) / (1 + 1e-4)) * pi / 2), s in [0, 1]."""
    s = torch.as_tensor(s, dtype=torch.float64)
    f = lambda x: torch.cos((x + 1e-4) / (1 + 1e-4) * math.pi / 2) ** 2
    return f(s) / f(torch.zeros((), dtype=torch.float64))


def alpha_bars(num_steps: int) -> torch.Tensor:
    """The curve discretised into num_steps: alpha_bar(i / num_steps), i = 0..num_steps-1, as float32.
    Training uses num_steps = T = 5000; inference re-discretises with its own N (§2)."""
    if num_steps < 1:
        raise ValueError(f"the number of diffusion steps must be positive, got {num_steps}")
    return alpha_bar(torch.arange(num_steps, dtype=torch.float64) / num_steps).float()


# -----------------------------------------------------------------------------
# Representation and forward process


def simplex(ids, vocab_size: int, k: float = SIMPLEX_VALUE, dtype=torch.float32):
    """Eq. 1: token w -> +k at w, -k elsewhere. (B, L) -> (B, L, V)."""
    s = torch.full((*ids.shape, vocab_size), -k, dtype=dtype, device=ids.device)
    return s.scatter_(-1, ids.unsqueeze(-1), k)


def add_noise(ids, eps, alpha_bar_t, k: float = SIMPLEX_VALUE):
    """Eq. 2: S_t = sqrt(alpha_bar_t) * S_0 + sqrt(1 - alpha_bar_t) * k * eps, with S_0 = simplex(ids).
    ids (B, L), eps (B, L, V) ~ N(0, I), alpha_bar_t (B,) -> S_t (B, L, V)."""
    ab = alpha_bar_t.to(eps.dtype).view(-1, 1, 1)  # (B, 1, 1): one timestep per sequence
    return ab.sqrt() * simplex(ids, eps.size(-1), k, eps.dtype) + (1 - ab).sqrt() * k * eps


def row_generators(seeds, device=None):
    """One generator per row, seeded by seeds[b]."""
    return [torch.Generator(device=device or "cpu").manual_seed(int(seed)) for seed in seeds]


def row_noise_(out, generators):
    """out (B, L, V) <- N(0, I), row b drawn from generators[b], so a row's noise does not depend on
    what else is in the batch (sampling) or on how a global batch is split across ranks and
    micro-batches (training). Sampling keeps the generators and draws every step's noise from them."""
    for b, g in enumerate(generators):
        out[b].normal_(generator=g)
    return out


def row_noise(seeds, length: int, vocab_size: int, device=None, dtype=torch.float32):
    """Fresh N(0, I) noise of shape (B, L, V), row b from a generator seeded by seeds[b] (row_noise_)."""
    out = torch.empty(len(seeds), length, vocab_size, device=device or "cpu", dtype=dtype)
    return row_noise_(out, row_generators(seeds, out.device))


# -----------------------------------------------------------------------------
# What the network sees (§4; self-conditioning Sec. 3.1, Eq. 7-8; label shift Sec. 3.2)


def predict(model, ids, span_mask, S_t, t, prev_logits=None, key_padding_mask=None):
    """
    One pass of the diffusion model. ids (B, L) clean tokens (used at context positions),
    span_mask (B, L) bool, S_t (B, L, V) noisy simplex (used at span positions), t (B,) scaled
    time in [0, 1), prev_logits (B, L, V) the previous prediction for self-conditioning or None;
    key_padding_mask (B, L) marks the real positions of rows padded to the batch's length.
    Returns logits (B, L, V) aligned so that logits[:, j] predicts token j; logits[:, 0] = 0.
    The checkpoint's config decides the attention kind (is_causal), self-conditioning and the
    timestep embedding, as in the released model's forward.
    """
    args, E = model.args, model.embed_tokens.weight  # E: (V, D)
    p = torch.softmax(S_t.float(), dim=-1)  # (B, L, V)
    if args.self_condition == "logits_mean" and args.self_condition_mix_before_weights:
        # Eq. 8: p = (softmax(S_t) + softmax(prev_logits)) / 2, where no previous prediction means
        # prev_logits = 0, a uniform distribution. (In place on p: one (B, L, V) tensor fewer.)
        p.add_(torch.softmax(prev_logits.float(), dim=-1) if prev_logits is not None else 1.0 / p.size(-1))
        p.mul_(0.5)
    # h = p @ E (Sec. 3.1). E is read detached, as the released model reads `.data`: the span path
    # gives E no gradient (E learns from context positions and a tied head), so autograd keeps no p.
    h_span = p.to(E.dtype) @ E.detach()  # (B, L, D)
    del p
    h = torch.where(span_mask.unsqueeze(-1), h_span, model.embed_tokens(ids))  # context: clean E[w]
    t_pos = t.view(-1, 1).to(h.dtype) * span_mask if args.timestep_embed else None  # (B, L): span only
    hidden = model.hidden_states(embeds=h, t=t_pos, key_padding_mask=key_padding_mask)  # (B, L, D)
    # label shift: the state at position j-1 predicts token j (as in the AR model it came from).
    # Shifting hidden states (not logits) avoids a (B, L, V) copy; the LM head has no bias, so
    # the zero state at position 0 gives logits[:, 0] = 0 exactly.
    hidden = F.pad(hidden[:, :-1], (0, 0, 1, 0))  # (B, L, D)
    return model.lm_head(hidden)  # (B, L, V)


# -----------------------------------------------------------------------------
# Training loss (Eq. 3, §5-6)


def diffusion_loss(model, ids, span_mask, t, eps, self_condition=False, k: float = SIMPLEX_VALUE,
                   num_steps: int = NUM_TRAIN_STEPS, reduction="mean", extra_pass=None):
    """
    One training step's loss. ids (B, L), span_mask (B, L) bool, t (B,) integer timesteps in
    [0, T) (uniform per sequence), eps (B, L, V) ~ N(0, I): the caller draws them (train.py, from
    each sequence's global index).
    self_condition: a bool for the whole batch, or a (B,) bool tensor, one coin per sequence
    (a row without it sees prev_logits = 0, i.e. uniform, as in predict). The t+1 pass runs if any
    row needs it, or always with extra_pass=True (a sharded model runs the same passes on every rank).
    Returns the cross-entropy over span positions j >= 1: their mean; with reduction="sum" the
    pair (sum, count) so that a caller can normalise over a global batch; with reduction="none"
    the per-sequence pair (sums (B,), counts (B,)) for a per-sequence mean.
    """
    B, L = ids.shape
    dev = ids.device
    coins = torch.as_tensor(self_condition, dtype=torch.bool).expand(B)  # (B,), on the host when given so
    schedule = lambda t: alpha_bar(t.double() / num_steps).float()  # = alpha_bars(T)[t], on t's device  # noqa: E731
    prev_logits = None
    if extra_pass or bool(coins.any()):  # Sec. 3.1: a prediction at t+1 with the same noise, no gradient
        t1 = (t + 1).clamp(max=num_steps - 1)
        with torch.no_grad():
            prev_logits = predict(model, ids, span_mask, add_noise(ids, eps, schedule(t1), k), t1 / num_steps)
            if not bool(coins.all()):  # the other rows: zero logits, i.e. the uniform distribution
                prev_logits.masked_fill_(~coins.to(dev).view(B, 1, 1), 0.0)
    logits = predict(model, ids, span_mask, add_noise(ids, eps, schedule(t), k), t / num_steps, prev_logits)
    del eps, prev_logits
    targets = ids.masked_fill(~span_mask, -100)  # (B, L)
    targets[:, 0] = -100  # logits[:, 0] predicts nothing
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                          reduction="none").view(B, L)  # 0 where ignored
    sums, counts = nll.sum(1), (targets != -100).sum(1)  # (B,), (B,)
    if reduction == "none":
        return sums, counts
    if reduction == "sum":
        return sums.sum(), counts.sum()
    return sums.sum() / counts.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# Masks: which positions are span. All return bool tensors; BOS (position 0) is never span.


def random_segmentation(num_items: int, num_segments: int, generator=None) -> torch.Tensor:
    """Split num_items into num_segments random non-empty parts (T5's _random_segmentation)."""
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([num_items])])
    return bounds.diff()  # (num_segments,)


def t5_span_mask(length: int, noise_density: float, mean_span_length: float, generator=None):
    """T5's random_spans_noise_mask (§7): non-overlapping random spans, starting unmasked."""
    num_mask = min(max(int(length * noise_density), 1), length - 1)
    num_spans = max(1, int(num_mask / mean_span_length))
    num_spans = min(num_spans, num_mask, length - num_mask)
    masked = random_segmentation(num_mask, num_spans, generator)
    unmasked = random_segmentation(length - num_mask, num_spans, generator)
    lengths = torch.stack([unmasked, masked], dim=1).flatten()  # unmasked, masked, unmasked, ...
    is_span = torch.tensor([False, True]).repeat(num_spans)
    return is_span.repeat_interleave(lengths)  # (length,)


def prefix_mask(length: int, prefix_length: int):
    """Prefix-LM: positions >= prefix_length are span (SFT: prefix = prompt incl. BOS)."""
    if not 1 <= prefix_length < length:
        raise ValueError(f"prefix length {prefix_length} must be in [1, {length}): BOS is always context "
                         "and at least one position must be generated")
    return torch.arange(length) >= prefix_length


def ul2_mask(length: int, generator=None, prefix: str = "released"):
    """
    §7, App. A.1: one of three objectives with equal weight.
      T5: 15% masked, mean span 3 or 8. Aggressive T5: 50% masked, mean span 3, 8 or 48.
      Prefix-LM: BOS plus a prefix of n tokens is context. prefix="released": n uniform in
                 [1, (L-1)//2) (released code's gpt_span_mask); prefix="paper": n = (L-1)//2,
                 the first half.
    The released run had one sequence per device batch, so "per batch" there is per sequence here.
    """
    if prefix not in ("released", "paper"):
        raise ValueError(f"prefix must be 'released' or 'paper', got {prefix!r}")

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=generator))]

    kind = int(torch.randint(3, (), generator=generator))
    if kind == 0:
        return t5_span_mask(length, 0.15, pick([3, 8]), generator)
    if kind == 1:
        return t5_span_mask(length, 0.5, pick([3, 8, 48]), generator)
    if prefix == "paper":
        return prefix_mask(length, 1 + (length - 1) // 2)
    n = int(torch.randint(1, (length - 1) // 2, (), generator=generator)) if length >= 5 else 1
    return prefix_mask(length, 1 + n)


# -----------------------------------------------------------------------------
# Reverse process (Eq. 4-5, §9)


def project(logits, top_p: float | None = None, generator=None):
    """Eq. 5: logits (..., V) -> tokens (...). argmax (paper) when top_p is None, else nucleus
    sampling at temperature 1 (the released evaluation scripts use top_p = 0.99): probs =
    softmax(logits in fp32) sorted descending, an entry kept iff the mass before it (cumsum - p)
    is at most top_p, and a token drawn from the kept entries in proportion to their probability,
    by the inverse CDF in the sorted order. Each position consumes one uniform draw from
    `generator`, in order, so its token depends only on its own logits and draw: a row's span
    projected with its own generator does not depend on the batch. Tokens of equal probability may
    come out of the sort in either order. (sample.py uses support/fused_sampling.project_fast, the
    same kept set found without sorting V.)"""
    if top_p is None:
        return logits.argmax(-1)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = torch.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])  # (n, V)
    u = torch.rand(len(probs), generator=generator, device=logits.device)  # (n,) one draw per position
    p, order = probs.sort(dim=-1, descending=True)  # (n, V)
    cum = p.cumsum(-1)  # (n, V)
    if cum[:, -1].isnan().any():  # softmax turns a NaN or +inf logit, or a row of -inf, into a NaN row
        raise ValueError("nucleus sampling needs finite logits (a row holds NaN or inf, or only -inf)")
    kept = (cum - p <= top_p).sum(-1, keepdim=True)  # (n, 1): the mass before an entry only grows
    mass = cum.gather(1, kept - 1)  # (n, 1) the kept mass
    # inverse CDF: the first entry whose cumulative mass exceeds u * (kept mass); the target stays
    # below the kept mass, so the draw never lands on a dropped or zero-probability entry
    target = torch.minimum(u.unsqueeze(1) * mass, mass.nextafter(torch.zeros_like(mass)))
    j = torch.searchsorted(cum, target, right=True)  # (n, 1)
    return order.gather(1, j).view(logits.shape[:-1])


def renoise(tokens, eps, alpha_bar_prev, k: float = SIMPLEX_VALUE):
    """Eq. 4: S_{t-1} = sqrt(alpha_bar_{t-1}) S_hat + sqrt(1 - alpha_bar_{t-1}) k eps, S_hat = simplex(tokens):
    the forward process (Eq. 2) from the projected tokens. tokens (B, L), eps (B, L, V), alpha_bar_prev (B,)."""
    return add_noise(tokens, eps, alpha_bar_prev, k)


def renoise_ddim(tokens, S_t, alpha_bar_t, alpha_bar_prev, k: float = SIMPLEX_VALUE):
    """The deterministic sampler's re-noising (METHOD.md §9, Eq. D1-D2; not in the paper): the noise
    implied by S_t and the projection S_hat = simplex(tokens) instead of fresh noise, as DDIM does:
      (D1) eps_hat = (S_t - sqrt(alpha_bar_t) S_hat) / (sqrt(1 - alpha_bar_t) k)
      (D2) S_{t-1} = sqrt(alpha_bar_{t-1}) S_hat + sqrt(1 - alpha_bar_{t-1}) k eps_hat  (Eq. 4 with eps_hat)
    alpha_bar_t: the level S_t was made at (0 for the first S, pure noise). tokens (B, L), S_t (B, L, V),
    alpha_bar_t and alpha_bar_prev (B,) -> S_{t-1} (B, L, V)."""
    ab = alpha_bar_t.to(S_t.dtype).view(-1, 1, 1)  # (B, 1, 1)
    eps_hat = (S_t - ab.sqrt() * simplex(tokens, S_t.size(-1), k, S_t.dtype)) / ((1 - ab).sqrt() * k)  # D1
    return renoise(tokens, eps_hat, alpha_bar_prev, k)  # D2


# -----------------------------------------------------------------------------
# Reward guidance (§10; Sec. 3.4, Eq. 9-11)


def reward_guidance(rm, logits, ids, span_mask, eta: float, steps: int = 1, tau: float = 1.0,
                    key_padding_mask=None, last_index=None):
    """
    `steps` rounds of gradient ascent on the reward, x <- x + eta * grad_x R(x), from x = logits (B, L, V).
    The reward model reads p = softmax(x / tau) @ E_rm at span positions and E_rm[token] (= one-hot
    @ E_rm) at context positions, causally, and scores position last_index (default: the last).
    Returns new fp32 logits; `logits` is not modified. The update is computed in fp32 whatever the
    models' dtype: in bf16 most of eta * grad is below the resolution of x and is lost (the released
    code runs all in bf16). For steps > 1 this is plain gradient ascent; the released loop never
    zeroes the gradient, so its step g adds eta * (g_1 + ... + g_g).
    Rows are independent: their rewards are summed only to get every row's gradient in one backward.
    """
    E = rm.embed_tokens.weight  # (V, D_rm)
    context = rm.embed_tokens(ids).detach()  # (B, L, D_rm)
    x = logits.detach().float()  # (B, L, V), a new tensor when logits are bf16, else a view: never updated in place
    for _ in range(steps):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            p = torch.softmax(x / tau, dim=-1)  # (B, L, V), Eq. 9
            h = torch.where(span_mask.unsqueeze(-1), p.to(E.dtype) @ E, context)  # (B, L, D_rm)
            reward = rm(embeds=h, causal=True, key_padding_mask=key_padding_mask, last_index=last_index)  # (B,)
            (grad,) = torch.autograd.grad(reward.float().sum(), x)  # (B, L, V), zero at context positions
        x = x.detach() + eta * grad  # Eq. 10-11
        del p, h, grad
    return x
