"""
Exact fast twins of the reverse process's projection and re-noising, used by sample.py. A student
may skip this file: each function names the definition in tess2.py that it equals, and
tests/test_fused_sampling.py proves them equal.

- project_fast: tess2.project (nucleus sampling, Eq. 5) without sorting the vocabulary in the
  common case.
- span_positions, project_spans, renoise_spans_: the projection (Eq. 5) and the re-noising (Eq. 4,
  tess2.renoise) at span positions only, row by row from each row's generator: predict reads S
  only at span positions, so (B, L, V) work elsewhere would be thrown away.
"""
import math

import torch

import tess2


# -----------------------------------------------------------------------------
# Span positions, row by row


def span_positions(span_mask):
    """Each row's span positions: a slice where they are one run (the usual prompt-then-region row,
    so that S[b, where] is a view), else their indices. span_mask (B, L) -> list of B."""
    out = []
    for mask in span_mask:
        idx = mask.nonzero().flatten()
        contiguous = len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx)
        out.append(slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx)
    return out


def renoise_spans_(S, tokens, alpha_bar, generators, where):
    """tess2.renoise (Eq. 4) in S's own buffer, at span positions only (where = span_positions(span_mask)):
    S[b, where[b]] <- sqrt(alpha_bar[b]) simplex(tokens) + sqrt(1 - alpha_bar[b]) k eps, row b's eps drawn
    from generators[b] over its span positions, in order (one (n_span, V) draw per row). The rest of S
    is left as it is: predict reads S only at span positions. Scaled, shifted by -k sqrt(alpha_bar)
    and given +2k sqrt(alpha_bar) at each token: no second (B, L, V) tensor. alpha_bar: one float per row."""
    k = tess2.SIMPLEX_VALUE
    for b, (g, w, ab) in enumerate(zip(generators, where, alpha_bar)):
        scale, shift, top = math.sqrt(1 - ab) * k, math.sqrt(ab) * k, 2 * k * math.sqrt(ab)
        x = S[b, w] if isinstance(w, slice) else S.new_empty(len(w), S.shape[-1])  # (n_span, V)
        x.normal_(generator=g).mul_(scale).sub_(shift)
        x.scatter_add_(-1, tokens[b, w].unsqueeze(-1), torch.full_like(x[:, :1], top))
        if not isinstance(w, slice):
            S[b, w] = x
    return S


def project_spans(logits, best, where, top_p, generators):
    """tess2.project (Eq. 5) at span positions only: row b's positions by nucleus sampling with
    top_p[b] and draws from generators[b] (project_fast), or, where top_p[b] is None, by argmax: its
    row of `best` (the argmax at span positions). logits (B, L, V), best (B, L) -> tokens (B, L)."""
    tokens = best.clone()
    for b, (g, w, p) in enumerate(zip(generators, where, top_p)):
        if p is not None:
            tokens[b, w] = project_fast(logits[b, w], p, g)  # (n_b,)
    return tokens


# -----------------------------------------------------------------------------
# Nucleus sampling without the sort


def project_fast(logits, top_p: float | None = None, generator=None):
    """Equal to tess2.project, token for token for the same generator, wherever the kept set is found
    in the sort's order: logits (..., V) -> tokens (...), the same kept set and kept mass bit for bit
    (_nucleus finds them without sorting V in the common case), one uniform per position from
    `generator`, in order, and the inverse CDF over the kept entries in descending order. One
    exception: positions whose boundary _nucleus finds inside one histogram bucket (flat logits, over
    half of V kept) draw from the same kept set in vocabulary order, which needs no sort of the kept
    set: the same distribution, another token for the same uniform. Tokens of equal probability may
    come in either order, as in the sort."""
    if top_p is None:
        return logits.argmax(-1)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    flat = logits.reshape(-1, logits.shape[-1])  # (n, V)
    u = torch.rand(len(flat), generator=generator, device=logits.device)  # (n,) one draw per position
    tokens = torch.empty(len(flat), dtype=torch.long, device=logits.device)
    for positions, cum, token, kept in _nucleus(flat, top_p):
        # inverse CDF: the first entry whose cumulative mass exceeds u * (kept mass); the target
        # stays below the kept mass, so the draw never lands on a dropped or zero-probability entry
        mass = cum[:, -1:] if token is None else cum.gather(1, kept.unsqueeze(1) - 1)  # (r, 1)
        target = torch.minimum(u[positions].unsqueeze(1) * mass, mass.nextafter(torch.zeros_like(mass)))
        j = torch.searchsorted(cum, target, right=True)  # (r, 1)
        tokens[positions] = (j if token is None else token.gather(1, j)).squeeze(1)
    return tokens.view(logits.shape[:-1])


EXACT = 2.0 ** -29  # fp32 values >= 2^-29 are multiples of 2^-52: sums below 2 of them are exact in float64


def _nucleus(logits, top_p: float, head: int = 64):
    """The kept set of nucleus sampling without sorting V in the common case. logits (n, V), one row
    per position -> yields (positions (r,), cum (r, k), token, kept) until every position is covered,
    in one of two forms:
      - token (r, k): the k most probable tokens in descending order, cum their cumulative
        probabilities, kept (r,) how many of them are kept;
      - token None (k = V, the vocabulary in its own order): kept (r, V) bool marks the kept
        tokens, and cum is the cumulative probability with the dropped tokens counted as zero.
    Found by, in turn: the top 64; from a histogram of the probabilities, a top-k that holds the
    kept set, or, where that would be over half of V (flat logits), the boundary found inside one
    histogram bucket; the full sort.

    Exact: in the first form cum is the full sort's cumsum bit for bit (on CPU, cumsum of fp32
    accumulates in float64 and rounds each prefix; the k largest probabilities in descending order
    are the sorted row's first k), and the mass before an entry only grows along the sorted row
    (cum grows, p shrinks), so the top-k holds the whole kept set once the mass before its last
    entry exceeds top_p. In the second form, fp32 values of at least 2^-29 are multiples of 2^-52,
    so float64 sums of them below 2 are exact in any order: the sort's cumsum at an entry of the
    bucket [lo, hi) is (the sum of all entries >= hi) + (the cumsum of the bucket's entries in
    descending order), rounded once to fp32, the same bits. It is taken where lo >= 2^-29 and the
    bucket holds both the last kept entry and a dropped one; any other position goes to the full sort.
    (A GPU's parallel fp32 scan may round the sort's cumsum differently, which matters only at a
    tie with top_p.) Ties: tokens of equal probability may come in either order, as in the sort,
    so at the boundary any of them may be the ones kept."""
    probs = torch.softmax(logits.float(), dim=-1)  # (n, V)
    V = probs.shape[-1]
    positions = torch.arange(len(probs), device=probs.device)
    # First try: the top 64 (or the full sort when V is that small)
    done, answer = _nucleus_top(probs, positions, min(head, V), top_p)
    if done.all():  # the common case: no copies
        yield answer
        return
    yield tuple(x[done] for x in answer)
    positions = positions[~done]
    # Second try: from a histogram, a top-k that holds the kept set, or the boundary's bucket
    j, count = _histogram(probs[positions], top_p)  # (r, 1), (r, 1024)
    top = count.gather(1, j).squeeze(1) + 1  # (r,)
    by_bucket = top > V // 2  # a top-k that large costs about the full sort: find the boundary in bucket j*
    last = []  # positions for the full sort
    if (~by_bucket).any():
        part = positions[~by_bucket]
        k = int(top[~by_bucket].max())
        done, answer = _nucleus_top(probs, part, V if k > V // 2 else max(2 * head, k), top_p)
        yield tuple(x[done] for x in answer)
        last.append(part[~done])
    if by_bucket.any():
        part, jb, cb = positions[by_bucket], j[by_bucket], count[by_bucket]  # (r,), (r, 1), (r, 1024)
        size = int((cb.gather(1, jb) - cb.gather(1, (jb - 1).clamp(min=0)).masked_fill(jb == 0, 0)).max())
        if 0 < size <= V // 8:
            bits = ((1023 - jb) << 20).int()  # (r, 1): the bucket's lowest fp32 bit pattern
            lo, hi = bits.view(torch.float32), (bits + (1 << 20)).view(torch.float32)
            ok, cum, kept = _nucleus_bucket(probs[part], lo, hi, size, top_p)
            if ok.any():
                yield part[ok], cum[ok], None, kept[ok]
            part = part[~ok]
        last.append(part)
    positions = torch.cat(last).sort().values
    if len(positions):  # the full sort: always exact
        yield _nucleus_top(probs, positions, V, top_p)[1]


def _histogram(probs, top_p: float):
    """Each probability of probs (r, V) bucketed by its bit pattern's top 12 bits (sign 0, the binary
    exponent and 3 bits of mantissa: bucket j holds an eighth of an octave, larger values first,
    zeros and subnormals last). Returns j* (r, 1), the first bucket where the mass of buckets 0..j*
    exceeds top_p, and the cumulative counts (r, 1024). The top (count of buckets 0..j*) + 1 then
    holds the kept set, and bucket j* the boundary (both checked by the caller, as the histogram's
    sums round differently from cumsum's)."""
    bucket = (1023 - (probs.view(torch.int32) >> 20)).long()  # (r, V) in [7, 1023]: the fp32 bits are monotone
    mass = probs.new_zeros(len(probs), 1024).scatter_add_(1, bucket, probs).cumsum(-1)  # (r, 1024)
    count = torch.zeros_like(mass).scatter_add_(1, bucket, torch.ones_like(probs)).cumsum(-1).long()  # exact < 2^24
    return (mass <= top_p).sum(-1, keepdim=True).clamp_(max=1023), count


def _nucleus_top(probs, positions, k: int, top_p: float):
    """The first form of _nucleus for the rows `positions` of probs, from their top k (k = V: the full sort).
    Returns done (r,), whether the top k holds the kept set, and (positions, cum, token, kept)."""
    V = probs.shape[-1]
    p, token = probs[positions].sort(dim=-1, descending=True) if k == V else probs[positions].topk(k)  # (r, k)
    cum = p.cumsum(-1)
    if cum[:, -1].isnan().any():  # softmax turns a NaN or +inf logit, or a row of -inf, into a NaN row
        raise ValueError("nucleus sampling needs finite logits (a row holds NaN or inf, or only -inf)")
    before = cum - p  # the mass before each entry, as the sort-based definition computes it
    done = (before[:, -1] > top_p) | (k == V)  # (r,): the last entry is dropped, so all later ones
    return done, (positions, cum, token, (before <= top_p).sum(-1))


def _nucleus_bucket(probs, lo, hi, size: int, top_p: float):
    """The kept set of the rows of probs (r, V) whose boundary lies in the histogram bucket [lo, hi)
    (r, 1) holding at most `size` entries. Returns ok (r,) (the rows answered exactly), cum (r, V) the
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
