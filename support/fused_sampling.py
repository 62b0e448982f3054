"""
Exact fast twins of the reverse process's projection and re-noising, and the parts of sample.step
that only save work, used by sample.py. A student may skip this file: each function names the
definition in tess2.py that it equals, and tests/test_fused_sampling.py and tests/test_shed.py
prove them equal.

- compiled_predict: tess2.predict through torch.compile (--compile).
- project_fast: tess2.project (nucleus sampling, Eq. 5) without sorting the vocabulary in the
  common case.
- span_positions, span_argmax, project_spans, renoise_spans_, renoise_ddim_spans_, renoise_rows_: the projection
  (Eq. 5) and the re-noising (Eq. 4, tess2.renoise; Eq. D1-D2, tess2.renoise_ddim) at span positions
  only, row by row from each row's generator: predict reads S only at span positions, so (B, L, V)
  work elsewhere would be thrown away.
- shed_tails, row_tokens, trailing_pad, shed_points, normal_prefix_: rows that stop computing their settled
  [PAD] tail (sample.start's shed), and still draw the dense run's noise for the positions they shed.
"""
import dataclasses
import functools
import math

import torch

import tess2


# -----------------------------------------------------------------------------
# The model's pass, compiled


@functools.cache
def compiled_predict():
    """--compile: tess2.predict as one graph (fullgraph: a graph break is an error). The default mode,
    not "reduce-overhead": its CUDA graphs overwrite a step's logits at the next replay while they are
    the next step's self-conditioning input (they would need a (B, L, V) clone each step), and record a
    graph per batch shape, which changes as rows leave and join; a large model's step is bound by its
    matrix products, where CUDA graphs save little."""
    return torch.compile(tess2.predict, fullgraph=True)


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


def span_count(w) -> int:
    """The number of positions in one row's entry of span_positions."""
    return w.stop - w.start if isinstance(w, slice) else len(w)


def span_argmax(logits, ids, where):
    """torch.where(span_mask, logits.argmax(-1), ids), the argmax taken only at each row's span positions
    (where, from span_positions): logits (B, L, V), ids (B, L) -> (B, L)."""
    best = ids.clone()
    for b, w in enumerate(where):
        best[b, w] = logits[b, w].argmax(-1)
    return best


def renoise_spans_(S, tokens, alpha_bar, generators, where, draws=None, rows=None):
    """tess2.renoise (Eq. 4) in S's own buffer, at span positions only (where = span_positions(span_mask)):
    S[b, where[b]] <- sqrt(alpha_bar[b]) simplex(tokens) + sqrt(1 - alpha_bar[b]) k eps, row b's eps drawn
    from generators[b] over its span positions, in order (one (n_span, V) draw per row). The rest of S
    is left as it is: predict reads S only at span positions. Scaled, shifted by -k sqrt(alpha_bar)
    and given +2k sqrt(alpha_bar) at each token: no second (B, L, V) tensor. alpha_bar: one float per row.
    draws[b] >= n_span: the positions row b draws noise for (normal_prefix_; default n_span); rows: the
    rows re-noised (default all)."""
    k = tess2.SIMPLEX_VALUE
    for b in range(len(where)) if rows is None else rows:
        g, w, ab = generators[b], where[b], alpha_bar[b]
        scale, shift, top = math.sqrt(1 - ab) * k, math.sqrt(ab) * k, 2 * k * math.sqrt(ab)
        x = S[b, w] if isinstance(w, slice) else S.new_empty(len(w), S.shape[-1])  # (n_span, V)
        normal_prefix_(x, span_count(w) if draws is None else draws[b], g).mul_(scale).sub_(shift)
        x.scatter_add_(-1, tokens[b, w].unsqueeze(-1), torch.full_like(x[:, :1], top))
        if not isinstance(w, slice):
            S[b, w] = x
    return S


def renoise_ddim_spans_(S, tokens, alpha_bar_t, alpha_bar_prev, where, rows=None):
    """tess2.renoise_ddim (Eq. D1-D2) in S's own buffer, at span positions only, for the rows `rows`
    (default all): D1 put into D2 is S_{t-1} = c S_t + d S_hat, c = sqrt((1 - alpha_bar_{t-1}) /
    (1 - alpha_bar_t)), d = sqrt(alpha_bar_{t-1}) - c sqrt(alpha_bar_t), S_hat = simplex(tokens): scaled
    by c, shifted by -k d, given +2k d at each token. No draw. alpha_bar_t, alpha_bar_prev: one float per row."""
    k = tess2.SIMPLEX_VALUE
    for b in range(len(where)) if rows is None else rows:
        w, ab, ab_prev = where[b], alpha_bar_t[b], alpha_bar_prev[b]
        c = math.sqrt((1 - ab_prev) / (1 - ab))
        d = math.sqrt(ab_prev) - c * math.sqrt(ab)
        x = S[b, w]  # (n_span, V): a view for a slice, else a copy
        x.mul_(c).sub_(k * d).scatter_add_(-1, tokens[b, w].unsqueeze(-1), torch.full_like(x[:, :1], 2 * k * d))
        if not isinstance(w, slice):
            S[b, w] = x
    return S


def project_spans(logits, best, where, top_p, generators, draws=None):
    """tess2.project (Eq. 5) at span positions only: row b's positions by nucleus sampling with
    top_p[b] and draws from generators[b] (project_fast), or, where top_p[b] is None, by argmax: its
    row of `best` (the argmax at span positions). logits (B, L, V), best (B, L) -> tokens (B, L).
    draws[b] >= n_span: the uniforms row b draws (its first n_span are used; default n_span)."""
    tokens = best.clone()
    for b, (g, w, p) in enumerate(zip(generators, where, top_p)):
        if p is not None:
            n = span_count(w)
            u = torch.rand(n if draws is None else draws[b], generator=g, device=logits.device)[:n]
            tokens[b, w] = nucleus_draw(logits[b, w], p, u)  # (n,)
    return tokens


def renoise_rows_(state):
    """sample.step's re-noising, on a sample.Denoising state: every row's S_{i-1}, i - 1 = N - 1 - taken,
    from its projection S_hat (Eq. 5), with fresh noise (Eq. 4) or, for the sampler "ddim", with the
    noise implied by S_i and S_hat (Eq. D1-D2), S_i made at alpha_bar_i or, at the first step, at 0 (S = k eps)."""
    draws = [span_count(w) + len(tail) for w, tail in zip(state.where, state.tails)]  # shed positions: still drawn
    tokens = project_spans(state.logits, state.best, state.where, state.top_p, state.generators, draws)
    schedule = {N: tess2.alpha_bars(N).tolist() for N in set(state.steps)}  # alpha_bar(i / N), i = 0..N-1
    now = [0.0 if n == 1 else schedule[N][N - n] for N, n in zip(state.steps, state.taken)]
    then = [schedule[N][N - 1 - n] for N, n in zip(state.steps, state.taken)]
    ddim = [kind == "ddim" for kind in state.sampler]
    renoise_spans_(state.S, tokens, then, state.generators, state.where, draws,
                   [b for b, d in enumerate(ddim) if not d])
    renoise_ddim_spans_(state.S, tokens, now, then, state.where, [b for b, d in enumerate(ddim) if d])


# -----------------------------------------------------------------------------
# Shedding a settled tail, and the noise a row that sheds still draws


def shed_tails(state):
    """sample.step's shedding, on a sample.Denoising state after a prediction: the count of steps each
    position has been its row's trailing [PAD] (in the argmax) goes on (`settled`), and each row with a
    `shed` M stops computing the positions counted M (shed_points): its
    length ends before them, their tokens go to its `tails`, and the batch narrows to its longest row,
    where the compute is saved. Its EOS stays: the model still sees where the answer ends."""
    if all(m is None for m in state.shed):
        return
    L, dev = state.ids.shape[1], state.ids.device
    real = torch.arange(L, device=dev) < torch.tensor(state.lengths, device=dev)[:, None]  # (B, L)
    state.settled = (state.settled + 1) * trailing_pad(state.best, state.span_mask, real, state.pad_id)  # (B, L)
    for b, c in enumerate(shed_points(state.settled, real, state.shed, state.where)):
        if c < state.lengths[b]:
            state.tails[b] = torch.cat([state.best[b, c:state.lengths[b]], state.tails[b]])
            state.lengths[b], state.where[b] = c, span_positions(state.span_mask[b:b + 1, :c])[0]
    width = max(state.lengths)
    for field in dataclasses.fields(state) if width < L else ():  # the (B, L, ...) tensors: their first width
        x = getattr(state, field.name)
        setattr(state, field.name, x[:, :width].contiguous() if isinstance(x, torch.Tensor) else x)


def row_tokens(state, b):
    """Row b's current text, (n,) for its n positions: its argmax over its length, then its shed tail
    (without shedding, state.best[b, :length])."""
    return torch.cat([state.best[b, :state.lengths[b]], state.tails[b]])


def trailing_pad(best, span_mask, real, pad_id):
    """Each row's trailing [PAD]: the run of span positions holding pad_id[b] in best that reaches the
    row's end (none where pad_id[b] is None). best, span_mask, real (the row's own positions) (B, L) -> (B, L) bool."""
    pad = torch.tensor([-1 if p is None else p for p in pad_id], device=best.device)[:, None]  # (B, 1)
    return ((best == pad) & span_mask | ~real).flip(-1).int().cumprod(-1).flip(-1).bool() & real


def shed_points(settled, real, shed, where) -> list:
    """Where each row's length ends once it sheds the run of positions, reaching its end, that have been
    its trailing [PAD] for shed[b] steps (settled (B, L) counts the steps; real (B, L) marks the row's
    positions). A row keeps its first span position; where shed[b] is None, its length is kept."""
    L = settled.shape[1]
    M = torch.tensor([L + 2**30 if m is None else m for m in shed], device=settled.device)[:, None]  # (B, 1)
    cut = (L - ((settled >= M) | ~real).flip(-1).int().cumprod(-1).sum(-1)).tolist()  # (one host sync)
    first = [(w.start if isinstance(w, slice) else int(w[0])) + 1 if span_count(w) else L for w in where]
    return [max(c, f) for c, f in zip(cut, first)]




def normal_prefix_(x, total: int, generator):
    """x (n, V) <- the first n rows of a (total, V) draw of N(0, I) from `generator` (x.normal_ when
    n = total), and the generator is left where the whole draw leaves it: a row that has shed the
    last total - n of its span positions (sample.py's shedding) keeps, at the others, the noise the
    dense run draws there, and every later draw of the dense run. On the CPU without drawing the
    rest (_normal_prefix_cpu_); elsewhere the whole draw, of which the first n rows are kept."""
    n, V = x.shape
    if n == total:
        return x.normal_(generator=generator)
    if x.device.type == "cpu" and x.dtype == torch.float32 and V >= 16 and x.is_contiguous():
        return _normal_prefix_cpu_(x, total, generator)
    return x.copy_(torch.empty(total, V, dtype=x.dtype, device=x.device).normal_(generator=generator)[:n])


def _normal_prefix_cpu_(x, total: int, generator, chunk: int = 1 << 22):
    """normal_prefix_ on the CPU, the rest of the draw skipped rather than drawn. PyTorch's CPU normal_
    of >= 16 fp32 values takes one 32-bit word of the generator per value, in order, turns them into
    normals in aligned blocks of 16 (Box-Muller), and, where the count is not a multiple of 16,
    redraws the last 16 values from 16 more words. So the first n V values are those of the blocks
    that cover them, and what remains of the draw is words to skip: int32 random_ takes one a value,
    without normal_'s arithmetic (bench/bench_shed.py: 1.5 ms a step where the whole draw takes 2.2 ms).
    tests/test_shed.py holds it to the whole draw."""
    n, V = x.shape
    covered = -(-n * V // 16) * 16  # the whole blocks that hold the kept values (V >= 16: within the draw)
    if covered == n * V:
        x.normal_(generator=generator)
    else:
        x.copy_(x.new_empty(covered).normal_(generator=generator)[:n * V].view(n, V))
    words = total * V - covered + (16 if total * V % 16 else 0)
    for start in range(0, words, chunk):  # at most 16 MiB at a time
        torch.empty(min(chunk, words - start), dtype=torch.int32).random_(generator=generator)
    return x


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
    return nucleus_draw(flat, top_p, u).view(logits.shape[:-1])


def nucleus_draw(flat, top_p: float, u):
    """project_fast's draw from its uniforms: flat (n, V) logits, u (n,) one uniform per position -> tokens (n,)."""
    tokens = torch.empty(len(flat), dtype=torch.long, device=flat.device)
    for positions, cum, token, kept in _nucleus(flat, top_p):
        # inverse CDF: the first entry whose cumulative mass exceeds u * (kept mass); the target
        # stays below the kept mass, so the draw never lands on a dropped or zero-probability entry
        mass = cum[:, -1:] if token is None else cum.gather(1, kept.unsqueeze(1) - 1)  # (r, 1)
        target = torch.minimum(u[positions].unsqueeze(1) * mass, mass.nextafter(torch.zeros_like(mass)))
        j = torch.searchsorted(cum, target, right=True)  # (r, 1)
        tokens[positions] = (j if token is None else token.gather(1, j)).squeeze(1)
    return tokens


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
