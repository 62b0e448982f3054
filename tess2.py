"""
TESS 2: simplex diffusion over a language model's vocabulary, equation by equation.

Each function cites the paper equation (seeds/tess2-paper.txt) or the SPEC.md section it
implements. Training (train.py), sampling (sample.py) and evaluation share these.

Notation: V vocabulary, D hidden size, k simplex value, T training timesteps, N inference steps,
B batch, L length. "span" positions are generated (span_mask True), "context" positions are
given as clean tokens.

Memory: every (B, L, V) float tensor costs 4*V = 128 KB per token in fp32 (262 MB per
2048-token sequence at V = 32001). predict reads S_t and the previous logits, mixes p in place
(softmax of the previous logits: a temporary, or with inplace=True S_t's buffer) and frees p once
embedded (in training autograd keeps it for the gradient of E) before the new logits exist:
sampling peaks at 3. A training step peaks at 5 with self-conditioning (eps, previous logits,
S_t, p, new logits) and 4 without (eps, S_t, p, logits; then p, logits, eps and the log-softmax
the loss keeps for backward).
"""
import math

import torch
import torch.nn.functional as F

SIMPLEX_VALUE = 5.0  # k
NUM_TRAIN_STEPS = 5000  # T


# -----------------------------------------------------------------------------
# Noise schedule (SPEC 2): cosine, "squaredcos_improved_ddpm"


def alpha_bar(s):
    """alpha_bar(s) = f(s) / f(0), f(s) = cos^2(((s + 1e-4) / (1 + 1e-4)) * pi / 2), s in [0, 1]."""
    s = torch.as_tensor(s, dtype=torch.float64)
    f = lambda x: torch.cos((x + 1e-4) / (1 + 1e-4) * math.pi / 2) ** 2
    return f(s) / f(torch.zeros((), dtype=torch.float64))


def alpha_bars(num_steps: int) -> torch.Tensor:
    """The curve discretised into num_steps: alpha_bar(i / num_steps), i = 0..num_steps-1, as float32.
    Training uses num_steps = T = 5000; inference re-discretises with its own N (SPEC 2)."""
    if num_steps < 1:
        raise ValueError(f"the number of diffusion steps must be positive, got {num_steps}")
    return alpha_bar(torch.arange(num_steps, dtype=torch.float64) / num_steps).float()


# -----------------------------------------------------------------------------
# Representation and forward process


def simplex(ids, vocab_size: int, k: float = SIMPLEX_VALUE, dtype=torch.float32):
    """Eq. 1: token w -> +k at w, -k elsewhere. (B, L) -> (B, L, V)."""
    s = torch.full((*ids.shape, vocab_size), -k, dtype=dtype, device=ids.device)
    return s.scatter_(-1, ids.unsqueeze(-1), k)


def add_noise(ids, eps, alpha_bar_t, k: float = SIMPLEX_VALUE, inplace: bool = False):
    """
    Eq. 2: S_t = sqrt(alpha_bar_t) * S_0 + sqrt(1 - alpha_bar_t) * k * eps, with S_0 = simplex(ids).
    ids (B, L), eps (B, L, V), alpha_bar_t (B,) -> S_t (B, L, V): a new tensor with eps kept (training
    reuses it for self-conditioning), or with inplace=True eps itself turned into S_t (sampling).
    Built without materialising S_0: scale eps, shift by -k sqrt(alpha_bar), add 2k sqrt(alpha_bar) at w.
    """
    a = alpha_bar_t.to(eps.dtype).view(-1, 1, 1)  # (B, 1, 1)
    S = eps.mul_((1 - a).sqrt() * k) if inplace else eps * ((1 - a).sqrt() * k)  # (B, L, V)
    S.sub_(a.sqrt() * k)
    return S.scatter_add_(-1, ids.unsqueeze(-1), (2 * k * a.sqrt()).expand(*ids.shape, 1).contiguous())


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
# What the network sees (SPEC 4, Sec. 3.1 self-conditioning Eq. 7-8, Sec. 3.2 label shift)


def predict(model, ids, span_mask, S_t, t, prev_logits=None, inplace: bool = False):
    """
    One pass of the diffusion model. ids (B, L) clean tokens (used at context positions),
    span_mask (B, L) bool, S_t (B, L, V) noisy simplex (used at span positions), t (B,) scaled
    time in [0, 1), prev_logits (B, L, V) the previous prediction for self-conditioning or None.
    Returns logits (B, L, V) aligned so that logits[:, j] predicts token j; logits[:, 0] = 0.
    inplace=True: S_t (fp32) is overwritten with softmax(prev_logits) once read, instead of that
    being a new (B, L, V) tensor (sampling, which draws the next S_t into the same buffer).
    """
    E = model.embed_tokens.weight  # (V, D)
    # Eq. 8 "logits_mean": p = (softmax(S_t) + softmax(prev_logits)) / 2; no previous
    # prediction means prev_logits = 0, i.e. a uniform distribution. Built in place: one tensor.
    p = torch.softmax(S_t.float(), dim=-1)  # (B, L, V)
    if prev_logits is None:
        p.add_(1.0 / p.size(-1))
    else:
        p.add_(torch.softmax(prev_logits.float(), dim=-1, out=S_t if inplace else None))
    p.mul_(0.5)
    # h = E p (Sec. 3.1). E is read detached here, as the released model reads `.data`: the span
    # path gives E no gradient (E learns from context positions and, if tied, the LM head), so
    # autograd keeps no (B, L, V) p for backward.
    h_span = p.to(E.dtype) @ E.detach()  # (B, L, D)
    del p
    h = torch.where(span_mask.unsqueeze(-1), h_span, model.embed_tokens(ids))  # context: clean E[w]
    t_pos = t.view(-1, 1).to(h.dtype) * span_mask  # (B, L): timestep term on span positions only
    hidden = model(embeds=h, t=t_pos, causal=False, hidden_only=True)  # (B, L, D), bidirectional
    # label shift: the state at position j-1 predicts token j (as in the AR model it came from).
    # Shifting hidden states (not logits) avoids a (B, L, V) copy; the LM head has no bias, so
    # the zero state at position 0 gives logits[:, 0] = 0 exactly.
    hidden = F.pad(hidden[:, :-1], (0, 0, 1, 0))  # (B, L, D)
    return model.lm_head(hidden)  # (B, L, V)


# -----------------------------------------------------------------------------
# Training loss (Eq. 3, SPEC 5-6)


def diffusion_loss(model, ids, span_mask, t=None, eps=None, self_condition=None, generator=None,
                   k: float = SIMPLEX_VALUE, num_steps: int = NUM_TRAIN_STEPS, reduction="mean"):
    """
    One training step's loss. ids (B, L), span_mask (B, L) bool.
    t (B,) integer timesteps in [0, T), eps (B, L, V) noise and self_condition (bool) are drawn
    from `generator` when not given (uniform t per sequence; self-conditioning with prob 0.5).
    Returns the cross-entropy over span positions j >= 1: their mean, or with reduction="sum"
    the pair (sum, count) so that a caller can normalise over a global batch.
    """
    B, L = ids.shape
    V = model.args.vocab_size
    dev = ids.device
    gdev = generator.device if generator is not None else dev  # draw where the generator lives
    if t is None:
        t = torch.randint(0, num_steps, (B,), generator=generator, device=gdev).to(dev)
    if eps is None:
        eps = torch.randn(B, L, V, generator=generator, device=gdev).to(dev)
    if self_condition is None:
        self_condition = bool(torch.rand((), generator=generator) < 0.5)
    ab = lambda t: alpha_bar(t.double() / num_steps).float()  # = alpha_bars(T)[t], made on t's device  # noqa: E731
    prev_logits = None
    if self_condition:  # Sec. 3.1: a prediction at t+1 with the same noise, no gradient
        t1 = (t + 1).clamp(max=num_steps - 1)
        with torch.no_grad():
            prev_logits = predict(model, ids, span_mask, add_noise(ids, eps, ab(t1), k), t1 / num_steps)
    logits = predict(model, ids, span_mask, add_noise(ids, eps, ab(t), k), t / num_steps, prev_logits)
    del eps, prev_logits
    targets = ids.masked_fill(~span_mask, -100)  # (B, L)
    targets[:, 0] = -100  # logits[:, 0] predicts nothing
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           reduction="sum")
    count = (targets != -100).sum()
    if reduction == "sum":
        return loss, count
    return loss / count.clamp(min=1)


# -----------------------------------------------------------------------------
# Masks: which positions are span. All return bool tensors; BOS (position 0) is never span.


def random_segmentation(num_items: int, num_segments: int, generator=None) -> torch.Tensor:
    """Split num_items into num_segments random non-empty parts (T5's _random_segmentation)."""
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([num_items])])
    return bounds.diff()  # (num_segments,)


def t5_span_mask(length: int, noise_density: float, mean_span_length: float, generator=None):
    """T5's random_spans_noise_mask (SPEC 7): non-overlapping random spans, starting unmasked."""
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
    SPEC 7 / App. A.1: one of three objectives with equal weight.
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
# Reverse process (Eq. 4-5, SPEC 9)


def project(logits, top_p: float | None = None, generator=None):
    """Eq. 5: logits (..., V) -> tokens (...). argmax (paper) when top_p is None, else nucleus
    sampling at temperature 1 (the released evaluation scripts use top_p = 0.99): probs =
    softmax(logits in fp32) sorted descending, an entry kept iff the mass before it (cumsum - p)
    is at most top_p, and a token drawn from the kept entries in proportion to their probability.
    The kept set is exactly that of the full sort (_nucleus finds it without one). Each position
    consumes one uniform draw from `generator`, in order, so its token depends only on its own
    logits and draw: a row's span projected with its own generator does not depend on the batch."""
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
        mass = cum.gather(1, kept.unsqueeze(1) - 1)  # (r, 1)
        target = torch.minimum(u[rows].unsqueeze(1) * mass, mass.nextafter(torch.zeros_like(mass)))
        tokens[rows] = token.gather(1, torch.searchsorted(cum, target, right=True)).squeeze(1)
    return tokens.view(logits.shape[:-1])


def _nucleus(logits, top_p: float, head: int = 64):
    """The kept set of nucleus sampling without sorting V in the common case. logits (n, V) ->
    yields (rows (r,), cum (r, k), token (r, k), kept (r,)) until every row is covered: for rows
    `rows`, the k most probable tokens in descending order, their cumulative probabilities and
    how many of them are kept. cum is the full sort's cumsum bit for bit (cumsum is sequential on
    CPU, and the k largest probabilities in descending order are the sorted row's first k; a GPU's
    parallel scan may round the last bit differently, which matters only at a tie with top_p), and
    the mass before an entry only grows along the row (cum grows, p shrinks), so the top-k holds the
    whole kept set once the mass before its last entry exceeds top_p. Tried in turn: the top 64; a top-k sized from a
    histogram of binary exponents; the full sort. Ties: tokens of equal probability may come in
    either order, as in the sort, so at the boundary any of them may be the ones kept."""
    probs = torch.softmax(logits.float(), dim=-1)  # (n, V)
    V = probs.shape[-1]
    rows, k = torch.arange(len(probs), device=probs.device), min(head, V)
    while len(rows):
        p, token = probs[rows].sort(dim=-1, descending=True) if k == V else probs[rows].topk(k)  # (r, k)
        cum = p.cumsum(-1)
        if cum[:, -1].isnan().any():  # softmax turns a NaN or +inf logit, or a row of -inf, into a NaN row
            raise ValueError("nucleus sampling needs finite logits (a row holds NaN or inf, or only -inf)")
        before = cum - p  # the mass before each entry, as the sort-based definition computes it
        done = (before[:, -1] > top_p) | (k == V)  # (r,): the last entry is dropped, so all later ones
        kept = (before <= top_p).sum(-1)
        if done.all():  # the common case: no copies
            yield rows, cum, token, kept
            return
        yield rows[done], cum[done], token[done], kept[done]
        rows, need = rows[~done], (top_p - before[~done, -1]) / p[~done, -1].clamp(min=1e-30)
        if k > head or need.max() > V // 2:  # after the second try, or (every later entry being at
            k = V                                # most p[:, -1]) when over half of V is still needed
            continue
        # Second try: bucket each probability by its binary exponent (bucket j holds [2^-j, 2^(1-j)),
        # zeros and subnormals in 127), find the first bucket j* where the mass of buckets 0..j*
        # exceeds top_p; the top (count of buckets 0..j*) + 1 then holds the kept set (checked above,
        # as the histogram's sums round differently from cumsum's).
        left = probs[rows]  # (r, V)
        bucket = (127 - (left.view(torch.int32) >> 23)).long()  # the float's exponent field
        mass = left.new_zeros(len(rows), 128).scatter_add_(1, bucket, left).cumsum(-1)  # (r, 128)
        count = torch.zeros_like(mass, dtype=torch.long).scatter_add_(1, bucket, torch.ones_like(bucket)).cumsum(-1)
        j = (mass <= top_p).sum(-1, keepdim=True).clamp_(max=127)  # (r, 1) the first bucket past top_p
        k = max(2 * k, int(count.gather(1, j).max()) + 1)
        k = V if k > V // 2 else k  # a top-k that large costs about the full sort


def renoise(tokens, eps, alpha_bar_prev, k: float = SIMPLEX_VALUE, inplace: bool = False):
    """Eq. 4: S_{t-1} = sqrt(alpha_bar_{t-1}) S_hat + sqrt(1 - alpha_bar_{t-1}) k eps, S_hat = simplex(tokens):
    the forward process (add_noise) from the projected tokens; inplace=True turns eps into S_{t-1}."""
    return add_noise(tokens, eps, alpha_bar_prev, k, inplace)
