"""
TESS 2: simplex diffusion over a language model's vocabulary, equation by equation.

Each function is one step of the method as METHOD.md describes it (section numbers there, "§n")
and cites the paper's equation (Tae, Ivison, Kumar and Cohan, "TESS 2: A Large-Scale Generalist
Diffusion Language Model", arXiv:2502.13917). These are the plain statements of the formulas; training
(train.py), sampling (sample.py) and evaluation (eval/) share them, and where a loop fuses one
to save memory it is tested equal to the plain version here.

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
    a = alpha_bar_t.to(eps.dtype).view(-1, 1, 1)  # (B, 1, 1): one timestep per sequence
    return a.sqrt() * simplex(ids, eps.size(-1), k, eps.dtype) + (1 - a).sqrt() * k * eps


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
    a, E = model.args, model.embed_tokens.weight  # E: (V, D)
    p = torch.softmax(S_t.float(), dim=-1)  # (B, L, V)
    if a.self_condition == "logits_mean" and a.self_condition_mix_before_weights:
        # Eq. 8: p = (softmax(S_t) + softmax(prev_logits)) / 2, where no previous prediction means
        # prev_logits = 0, a uniform distribution. (In place on p: one (B, L, V) tensor fewer.)
        p.add_(torch.softmax(prev_logits.float(), dim=-1) if prev_logits is not None else 1.0 / p.size(-1))
        p.mul_(0.5)
    # h = p @ E (Sec. 3.1). E is read detached, as the released model reads `.data`: the span path
    # gives E no gradient (E learns from context positions and a tied head), so autograd keeps no p.
    h_span = p.to(E.dtype) @ E.detach()  # (B, L, D)
    del p
    h = torch.where(span_mask.unsqueeze(-1), h_span, model.embed_tokens(ids))  # context: clean E[w]
    t_pos = t.view(-1, 1).to(h.dtype) * span_mask if a.timestep_embed else None  # (B, L): span only
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
    rows = torch.as_tensor(self_condition, dtype=torch.bool).expand(B)  # (B,), on the host when given so
    ab = lambda t: alpha_bar(t.double() / num_steps).float()  # = alpha_bars(T)[t], made on t's device  # noqa: E731
    prev_logits = None
    if extra_pass or bool(rows.any()):  # Sec. 3.1: a prediction at t+1 with the same noise, no gradient
        t1 = (t + 1).clamp(max=num_steps - 1)
        with torch.no_grad():
            prev_logits = predict(model, ids, span_mask, add_noise(ids, eps, ab(t1), k), t1 / num_steps)
            if not bool(rows.all()):  # the other rows: zero logits, i.e. the uniform distribution
                prev_logits.masked_fill_(~rows.to(dev).view(B, 1, 1), 0.0)
    logits = predict(model, ids, span_mask, add_noise(ids, eps, ab(t), k), t / num_steps, prev_logits)
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
    is at most top_p, and a token drawn from the kept entries in proportion to their probability.
    The kept set and its mass are exactly those of the full sort (_nucleus finds them without one).
    Each position consumes one uniform draw from `generator`, in order, so its token depends only
    on its own logits and draw: a row's span projected with its own generator does not depend on
    the batch."""
    if top_p is None:
        return logits.argmax(-1)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    flat = logits.reshape(-1, logits.shape[-1])  # (n, V)
    u = torch.rand(len(flat), generator=generator, device=logits.device)  # (n,) one draw per position
    tokens = torch.empty(len(flat), dtype=torch.long, device=logits.device)
    for rows, cum, token, kept in _nucleus(flat, top_p):
        # inverse CDF: the first entry whose cumulative mass exceeds u * (kept mass); the target
        # stays below the kept mass, so the draw never lands on a dropped or zero-probability entry
        mass = cum[:, -1:] if token is None else cum.gather(1, kept.unsqueeze(1) - 1)  # (r, 1)
        target = torch.minimum(u[rows].unsqueeze(1) * mass, mass.nextafter(torch.zeros_like(mass)))
        j = torch.searchsorted(cum, target, right=True)  # (r, 1)
        tokens[rows] = (j if token is None else token.gather(1, j)).squeeze(1)
    return tokens.view(logits.shape[:-1])


EXACT = 2.0 ** -29  # fp32 values >= 2^-29 are multiples of 2^-52: sums below 2 of them are exact in float64


def _nucleus(logits, top_p: float, head: int = 64):
    """The kept set of nucleus sampling without sorting V in the common case. logits (n, V) ->
    yields (rows (r,), cum (r, k), token, kept) until every row is covered, in one of two forms:
      - token (r, k): the k most probable tokens in descending order, cum their cumulative
        probabilities, kept (r,) how many of them are kept;
      - token None (k = V, the vocabulary in its own order): kept (r, V) bool marks the kept
        tokens, and cum is the cumulative probability with the dropped tokens counted as zero.
    Found by, in turn: the top 64; from a histogram of the probabilities, a top-k that holds the
    kept set, or, where that would be over half of V (flat rows), the boundary found inside one
    histogram bucket; the full sort.

    Exact: in the first form cum is the full sort's cumsum bit for bit (on CPU, cumsum of fp32
    accumulates in float64 and rounds each prefix; the k largest probabilities in descending order
    are the sorted row's first k), and the mass before an entry only grows along the sorted row
    (cum grows, p shrinks), so the top-k holds the whole kept set once the mass before its last
    entry exceeds top_p. In the second form, fp32 values of at least 2^-29 are multiples of 2^-52,
    so float64 sums of them below 2 are exact in any order: the sort's cumsum at an entry of the
    bucket [lo, hi) is (the sum of all entries >= hi) + (the cumsum of the bucket's entries in
    descending order), rounded once to fp32, the same bits. It is taken where lo >= 2^-29 and the
    bucket holds both the last kept entry and a dropped one; any other row goes to the full sort.
    (A GPU's parallel fp32 scan may round the sort's cumsum differently, which matters only at a
    tie with top_p.) Ties: tokens of equal probability may come in either order, as in the sort,
    so at the boundary any of them may be the ones kept."""
    probs = torch.softmax(logits.float(), dim=-1)  # (n, V)
    V = probs.shape[-1]
    rows = torch.arange(len(probs), device=probs.device)
    # First try: the top 64 (or the full sort when V is that small)
    done, answer = _nucleus_top(probs, rows, min(head, V), top_p)
    if done.all():  # the common case: no copies
        yield answer
        return
    yield tuple(x[done] for x in answer)
    rows = rows[~done]
    # Second try: bucket each probability by its bit pattern's top 12 bits (sign 0, the binary
    # exponent and 3 bits of mantissa: bucket j holds an eighth of an octave, larger values first,
    # zeros and subnormals last) and find the first bucket j* where the mass of buckets 0..j*
    # exceeds top_p. The top (count of buckets 0..j*) + 1 then holds the kept set, and bucket j*
    # the boundary (both checked, as the histogram's sums round differently from cumsum's).
    left = probs[rows]  # (r, V)
    bucket = (1023 - (left.view(torch.int32) >> 20)).long()  # (r, V) in [7, 1023]: the fp32 bits are monotone
    mass = left.new_zeros(len(rows), 1024).scatter_add_(1, bucket, left).cumsum(-1)  # (r, 1024)
    count = torch.zeros_like(mass).scatter_add_(1, bucket, torch.ones_like(left)).cumsum(-1).long()  # exact below 2^24
    del left, bucket
    j = (mass <= top_p).sum(-1, keepdim=True).clamp_(max=1023)  # (r, 1): the first bucket past top_p
    top = count.gather(1, j).squeeze(1) + 1  # (r,)
    by_bucket = top > V // 2  # a top-k that large costs about the full sort: find the boundary in bucket j*
    last = []  # rows for the full sort
    if (~by_bucket).any():
        r = rows[~by_bucket]
        k = int(top[~by_bucket].max())
        done, answer = _nucleus_top(probs, r, V if k > V // 2 else max(2 * head, k), top_p)
        yield tuple(x[done] for x in answer)
        last.append(r[~done])
    if by_bucket.any():
        r, jb, cb = rows[by_bucket], j[by_bucket], count[by_bucket]  # (r,), (r, 1), (r, 1024)
        size = int((cb.gather(1, jb) - cb.gather(1, (jb - 1).clamp(min=0)).masked_fill(jb == 0, 0)).max())
        if 0 < size <= V // 8:
            bits = ((1023 - jb) << 20).int()  # (r, 1): the bucket's lowest fp32 bit pattern
            ok, cum, kept = _nucleus_bucket(probs[r], bits.view(torch.float32), (bits + (1 << 20)).view(torch.float32),
                                            size, top_p)
            if ok.any():
                yield r[ok], cum[ok], None, kept[ok]
            r = r[~ok]
        last.append(r)
    rows = torch.cat(last).sort().values
    if len(rows):  # the full sort: always exact
        yield _nucleus_top(probs, rows, V, top_p)[1]


def _nucleus_top(probs, rows, k: int, top_p: float):
    """The first form of _nucleus for rows `rows` of probs from their top k (k = V: the full sort).
    Returns done (r,), whether the top k holds the kept set, and (rows, cum, token, kept)."""
    V = probs.shape[-1]
    p, token = probs[rows].sort(dim=-1, descending=True) if k == V else probs[rows].topk(k)  # (r, k)
    cum = p.cumsum(-1)
    if cum[:, -1].isnan().any():  # softmax turns a NaN or +inf logit, or a row of -inf, into a NaN row
        raise ValueError("nucleus sampling needs finite logits (a row holds NaN or inf, or only -inf)")
    before = cum - p  # the mass before each entry, as the sort-based definition computes it
    done = (before[:, -1] > top_p) | (k == V)  # (r,): the last entry is dropped, so all later ones
    return done, (rows, cum, token, (before <= top_p).sum(-1))


def _nucleus_bucket(probs, lo, hi, size: int, top_p: float):
    """The kept set of rows probs (r, V) whose boundary lies in the histogram bucket [lo, hi) (r, 1)
    holding at most `size` entries. Returns ok (r,) (the rows answered exactly), cum (r, V) the
    cumulative probability in vocabulary order with dropped tokens counted as zero, and kept (r, V)
    bool. See _nucleus for why this is exact."""
    above = torch.where(probs >= hi, probs, 0.0).sum(-1, keepdim=True, dtype=torch.float64)  # (r, 1) exact
    q, idx = torch.where((probs >= lo) & (probs < hi), probs, -1.0).topk(size)  # (r, size) the bucket, descending
    valid = q >= 0  # (the rest is padding)
    cum = (above + q.clamp(min=0).double().cumsum(-1)).float()  # the sort's cumsum at each bucket entry
    before = cum - q  # the mass before each entry, as the definition computes it
    keep = valid & (before <= top_p)  # (r, size)
    # exact when the bucket's values are >= 2^-29 and the boundary is inside it: its largest entry
    # kept (so is everything above) and one of its entries dropped (so is everything below)
    ok = (lo.squeeze(1) >= EXACT) & keep[:, 0] & (valid & ~keep).any(-1)
    above_hi = probs >= hi  # (r, V)
    kept = above_hi.scatter(1, idx, torch.where(valid, keep, above_hi.gather(1, idx)))  # padding: left as it is
    return ok, probs.masked_fill(~kept, 0.0).cumsum(-1), kept


def renoise(tokens, eps, alpha_bar_prev, k: float = SIMPLEX_VALUE):
    """Eq. 4: S_{t-1} = sqrt(alpha_bar_{t-1}) S_hat + sqrt(1 - alpha_bar_{t-1}) k eps, S_hat = simplex(tokens):
    the forward process (Eq. 2) from the projected tokens. tokens (B, L), eps (B, L, V), alpha_bar_prev (B,)."""
    return add_noise(tokens, eps, alpha_bar_prev, k)


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
