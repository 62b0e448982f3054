"""support/fused_sampling.py, each function against the definition it is the twin of.

project_fast (nucleus sampling, paper Eq. 5, METHOD.md §9) keeps exactly the set the sort-based
definition keeps, without sorting V in the common case, and samples from it: token for token as
tess2.project where it finds the kept set in the sort's order, from the same distribution in
vocabulary order where it finds the boundary inside a histogram bucket.

The definition, written out here as the reference: probs = softmax(logits in fp32), sorted
descending; an entry is kept iff the mass before it (cumsum - p) is at most top_p; a token is drawn
from the kept entries in proportion to their probabilities.

"Exactly", with ties: the number of kept entries is a function of the sorted probabilities alone,
so it must be equal, and so must the kept probabilities, value for value and bit for bit. Tokens of
equal probability can come out of a sort in either order, so where a tie straddles the boundary the
definition itself does not say which of the tied tokens are kept: any of them may be, as long as
every token more probable than the boundary is kept and no token is kept twice.

renoise_spans_ and project_spans are Eq. 4 and Eq. 5 at span positions only, row by row from each
row's generator.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import tess2
from support import fused_sampling
from support.fused_sampling import (_nucleus, project_fast, project_spans, renoise_ddim_spans_, renoise_spans_,
                                    span_positions)

V = 32001  # Mistral's vocabulary plus [PAD]


def definition(logits, top_p):
    """The sort-based definition: probs (n, V), sorted probs (n, V), order (n, V), kept counts (n,)."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    kept = (sorted_p.cumsum(-1) - sorted_p <= top_p).sum(-1)
    return probs, sorted_p, order, kept


def kept_sets(logits, top_p):
    """_nucleus's answer per position: {position: (cum, token, kept)} and the forms it answered in: the head
    width k of the sorted form, or "vocab" for the vocabulary-order form (token None, kept a mask),
    which it gives where it finds the boundary inside one histogram bucket."""
    out, widths = {}, []
    for positions, cum, token, kept in _nucleus(logits, top_p):
        widths.append("vocab" if token is None else cum.shape[1])
        for i, r in enumerate(positions.tolist()):
            assert r not in out, "a row answered twice"
            out[r] = (cum[i], None if token is None else token[i], kept[i] if token is None else int(kept[i]))
    assert sorted(out) == list(range(len(logits))), "a row left out"
    return out, widths


def assert_exact(logits, top_p):
    """The kept set equals the definition's in the sense of the module docstring, and so does its
    mass (what the draw renormalises by). Returns the forms _nucleus answered in."""
    probs, sorted_p, _, kept = definition(logits, top_p)
    got, widths = kept_sets(logits, top_p)
    for r, (cum, token, m) in got.items():
        if token is None:  # vocabulary order: m is a mask, cum the cumulative kept mass in that order
            t, m = m.nonzero().flatten(), int(m.sum())
            assert torch.equal(cum, probs[r].masked_fill(~got[r][2], 0.0).cumsum(-1)), f"row {r}: cum"
            mass = cum[-1]
        else:
            t = token[:m]
            assert (probs[r, t] == sorted_p[r, :m]).all(), f"row {r}: not in descending order"
            assert torch.equal(cum[:m], sorted_p[r, :m].cumsum(-1)), f"row {r}: cumulative mass"
            mass = cum[m - 1]
        assert m == kept[r], f"row {r}: {m} kept, the definition keeps {int(kept[r])}"
        assert len(set(t.tolist())) == m, f"row {r}: a token kept twice"
        assert torch.equal(probs[r, t].sort(descending=True).values, sorted_p[r, :m]), f"row {r}: kept probabilities"
        assert torch.equal(mass, sorted_p[r, :m].cumsum(-1)[-1]), f"row {r}: kept mass"
        boundary = sorted_p[r, m - 1]
        assert set(t.tolist()) >= set((probs[r] > boundary).nonzero().flatten().tolist())
    return widths


def zipf(s, n, generator):
    """(n, V) logits -s log(rank), each row's ranks in a random order of the tokens."""
    ranks = torch.rand(n, V, generator=generator).argsort(-1) + 1
    return -s * ranks.float().log()


# -----------------------------------------------------------------------------
# The kept set


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_kept_set_equals_the_sort_on_peaked_zipf_and_flat_logits(top_p):
    g = torch.Generator().manual_seed(0)
    for logits in (zipf(3.0, 4, g), zipf(2.0, 4, g), zipf(1.5, 4, g), zipf(1.2, 4, g), zipf(1.0, 4, g),
                   torch.randn(4, V, generator=g), 4 * torch.randn(4, V, generator=g)):
        assert_exact(logits, top_p)


def test_each_way_of_finding_the_kept_set_is_taken_and_exact():
    """The top 64 (peaked), a histogram-sized top-k (Zipf 1.5: ~2900 kept), the boundary's bucket
    (flat: ~29,000 kept), the full sort (logits of 4 values: the boundary's bucket is a quarter of V)."""
    g = torch.Generator().manual_seed(1)
    assert assert_exact(zipf(2.0, 8, g), 0.99) == [64]
    widths = assert_exact(zipf(1.5, 8, g), 0.99)
    assert len(widths) == 2 and widths[0] == 64 and 64 < widths[1] < V  # the histogram's size suffices
    assert assert_exact(torch.randn(8, V, generator=g), 0.99) == [64, "vocab"]
    assert assert_exact(torch.randn(8, V, generator=g), 0.85) == [64, "vocab"]  # half of V kept
    assert assert_exact(torch.randint(0, 4, (4, V), generator=g).float(), 0.9) == [64, V]
    # a batch mixing the three: every row still gets its own exact answer
    mixed = torch.cat([zipf(2.0, 3, g), zipf(1.5, 3, g), torch.randn(3, V, generator=g)])[torch.randperm(9)]
    assert set(assert_exact(mixed, 0.99)) == {64, "vocab"} | {w for w in assert_exact(mixed, 0.99) if w != "vocab"}


def test_the_bucket_falls_back_to_the_sort_where_its_sums_would_not_be_exact(monkeypatch):
    """A row whose probabilities near the boundary are below the exactness threshold (2^-29: below
    it fp32 values are not multiples of 2^-52 and float64 sums of them round) takes the full sort.
    Raised here to 2^-14 so that flat rows (p ~ 2^-15) fall under it; the answer stays exact."""
    g = torch.Generator().manual_seed(15)
    logits = torch.cat([torch.randn(3, V, generator=g), zipf(2.0, 2, g)])
    assert assert_exact(logits, 0.99) == [64, "vocab"]
    monkeypatch.setattr(fused_sampling, "EXACT", 2.0 ** -14)
    assert assert_exact(logits, 0.99) == [64, V]


def test_the_buckets_kept_mass_is_the_sorts_to_the_bit():
    """Where cumsum's order matters in fp32 (many small values after a large one), the mass found
    from the bucket still equals the sort's cumulative sum at the boundary: the kept set and
    renormalisation are exact."""
    g = torch.Generator().manual_seed(16)
    logits = torch.randn(16, V, generator=g)
    logits[:8, 0] = 12.0  # one token holding ~ 0.6 of the mass
    for top_p in (0.9, 0.99, 0.999):
        forms = assert_exact(logits, top_p)
        assert "vocab" in forms, (top_p, forms)


def test_kept_set_with_ties_at_the_boundary():
    g = torch.Generator().manual_seed(2)
    # logits from 4 values: every boundary falls inside a group of thousands of equal probabilities
    coarse = torch.randint(0, 4, (6, V), generator=g).float()
    for top_p in (0.3, 0.9, 0.99):
        assert_exact(coarse, top_p)
    # logits from 16 values: the boundary falls inside a tie of ~2000 in the bucket searched
    finer = torch.randint(0, 16, (6, V), generator=g).float() / 4
    for top_p in (0.9, 0.99):
        assert assert_exact(finer, top_p) == [64, "vocab"]
    # 100 tokens tied at the top: the kept set ends inside the tie, past the first head of 64
    tied = torch.full((3, V), -10.0)
    tied[:, torch.randperm(V, generator=g)[:100]] = 5.0
    widths = assert_exact(tied, 0.7)
    assert widths[0] == 64 and len(widths) > 1
    probs, _, _, kept = definition(tied, 0.7)
    assert 64 < int(kept[0]) < 100


def test_kept_set_for_top_p_one_and_tiny_top_p():
    g = torch.Generator().manual_seed(3)
    logits = torch.cat([zipf(2.0, 2, g), torch.randn(2, V, generator=g)])
    logits[0, :1000] = -math.inf  # probability 0: kept under top_p = 1 (nothing exceeds it before them)
    assert_exact(logits, 1.0)
    assert_exact(logits, 1e-9)  # only the most probable token
    assert (definition(logits, 1e-9)[3] == 1).all()


def test_kept_set_of_bf16_logits_is_the_definition_on_their_fp32_values():
    g = torch.Generator().manual_seed(4)
    logits = torch.cat([zipf(1.5, 3, g), torch.randn(3, V, generator=g)]).bfloat16()  # bf16 makes ties too
    assert_exact(logits, 0.99)


def test_small_vocabularies():
    g = torch.Generator().manual_seed(5)
    for v in (1, 2, 10, 64, 65, 200):
        assert_exact(torch.randn(5, v, generator=g), 0.9)


# -----------------------------------------------------------------------------
# Sampling from it


def test_a_draw_is_the_inverse_cdf_of_the_kept_set_at_the_same_uniform():
    """One uniform u per position: the token is the first kept entry whose cumulative mass exceeds
    u * (kept mass), the entries taken in the sort's order where _nucleus answers in it (compared
    by probability, so tie order does not matter) and in the vocabulary's order where it answers
    from the boundary's bucket (flat rows). Either way each kept token is drawn with probability p / (kept mass)."""
    g = torch.Generator().manual_seed(6)
    logits = torch.cat([zipf(2.0, 40, g), zipf(1.5, 40, g), torch.randn(40, V, generator=g)])
    tokens = project_fast(logits, 0.99, torch.Generator().manual_seed(7))
    u = torch.rand(len(logits), generator=torch.Generator().manual_seed(7))
    probs, sorted_p, order, kept = definition(logits, 0.99)
    n = torch.arange(len(logits))
    cum = sorted_p.cumsum(-1)
    mass = cum[n, kept - 1]
    target = (u * mass).unsqueeze(1)
    by_sort = order[n, (cum <= target).sum(-1)]  # entries whose cumulative mass is at most the target
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for r in range(len(logits)):
        keep[r, order[r, :kept[r]]] = True
    by_vocab = (probs.masked_fill(~keep, 0.0).cumsum(-1) <= target).sum(-1)
    tail = torch.zeros(len(logits), dtype=torch.bool)
    for positions, _, token, _ in _nucleus(logits, 0.99):
        tail[positions] = token is None
    assert tail[80:].all() and not tail[:80].any()
    assert torch.equal(probs.gather(1, tokens[:80, None]), probs.gather(1, by_sort[:80, None]))
    assert torch.equal(tokens[80:], by_vocab[80:])
    assert keep.gather(1, tokens[:, None]).all()


def test_sampling_frequencies_match_the_renormalised_kept_distribution():
    p = torch.tensor([0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05, 0.03, 0.015, 0.005])
    logits = p.log()[torch.tensor([3, 7, 0, 9, 1, 5, 8, 2, 6, 4])]  # tokens in a shuffled order
    n = 200_000
    for top_p in (0.7, 0.95, 1.0):
        probs, sorted_p, order, kept = definition(logits[None], top_p)
        m = int(kept[0])
        expected = torch.zeros(10)
        expected[order[0, :m]] = sorted_p[0, :m] / sorted_p[0, :m].sum()
        tokens = project_fast(logits.expand(n, 10), top_p, torch.Generator().manual_seed(8))
        counts = torch.bincount(tokens, minlength=10).double()
        assert (counts[expected == 0] == 0).all(), "a dropped token was drawn"
        e = n * expected[expected > 0].double()
        chi2 = float(((counts[expected > 0] - e) ** 2 / e).sum())
        limit = {3: 21.1, 6: 27.9, 9: 33.7}[m - 1]  # the chi-square's 1e-4 critical value for m - 1 degrees of freedom
        assert chi2 < limit, f"top_p {top_p}: chi-square {chi2:.1f} with {m - 1} degrees of freedom"


def test_tokens_of_probability_zero_are_never_drawn():
    logits = torch.randn(20_000, 50, generator=torch.Generator().manual_seed(9))
    logits[:, 25:] = -math.inf
    tokens = project_fast(logits, 1.0, torch.Generator().manual_seed(10))
    assert tokens.max() < 25


def test_tiny_top_p_gives_a_most_probable_token():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(50, V, generator=g)
    logits[:, 7] = logits[:, 9] = 10.0  # a tie at the top: either is the argmax
    tokens = project_fast(logits, 1e-9, g)
    assert set(tokens.tolist()) <= {7, 9}
    assert torch.equal(project_fast(logits[:, :7], 1e-9, g), logits[:, :7].argmax(-1))


# -----------------------------------------------------------------------------
# Random streams, shapes, arguments


def test_sampling_is_determined_by_the_seed_and_uses_one_draw_per_position():
    g = torch.Generator().manual_seed(12)
    logits = torch.cat([zipf(2.0, 30, g), zipf(1.5, 10, g), torch.randn(10, V, generator=g)])
    a = project_fast(logits, 0.99, torch.Generator().manual_seed(1))
    assert torch.equal(a, project_fast(logits, 0.99, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, project_fast(logits, 0.99, torch.Generator().manual_seed(2)))
    used, fresh = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    project_fast(logits, 0.99, used)
    torch.rand(len(logits), generator=fresh)
    assert torch.equal(used.get_state(), fresh.get_state())


def test_a_positions_token_does_not_depend_on_the_other_positions():
    """The first 30 positions alone, or followed by flat rows that need the full sort: same tokens."""
    g = torch.Generator().manual_seed(13)
    first, rest = zipf(2.0, 30, g), torch.randn(20, V, generator=g)
    alone = project_fast(first, 0.99, torch.Generator().manual_seed(4))
    together = project_fast(torch.cat([first, rest]), 0.99, torch.Generator().manual_seed(4))
    assert torch.equal(together[:30], alone)


def test_project_keeps_the_leading_shape_and_argmax_without_top_p():
    g = torch.Generator().manual_seed(14)
    logits = torch.randn(2, 3, 100, generator=g)
    assert project_fast(logits, 0.9, g).shape == (2, 3)
    assert project_fast(logits[0, 0], 0.9, g).shape == ()
    assert torch.equal(project_fast(logits), logits.argmax(-1))
    assert torch.equal(project_fast(logits.bfloat16()), logits.bfloat16().argmax(-1))
    assert project_fast(logits.bfloat16(), 0.9, g).dtype == torch.long


def test_project_refuses_logits_that_give_no_distribution():
    for bad in (math.nan, math.inf):
        for v in (10, V):  # the full sort at once, and the top 64 first
            logits = torch.randn(3, v)
            logits[1, 5] = bad
            with pytest.raises(ValueError, match="finite logits"):
                project_fast(logits, 0.9, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="finite logits"):
        project_fast(torch.full((2, 10), -math.inf), 0.9)


def test_project_refuses_an_invalid_top_p():
    for bad in (0.0, -0.5, 1.01, 2.0, math.nan):
        with pytest.raises(ValueError, match="top_p"):
            project_fast(torch.randn(2, 5), top_p=bad)


@pytest.mark.slow  # ~12 s
def test_sampling_frequencies_in_vocabulary_order_match_the_renormalised_kept_distribution():
    """The vocabulary-order draw (flat rows, kept set found from the boundary's bucket) has the kept set's
    renormalised distribution: a chi-square test over ~180 kept tokens of 200."""
    logits = torch.randn(200, generator=torch.Generator().manual_seed(18))  # a seed whose boundary bucket is small
    probs, sorted_p, order, kept = definition(logits[None], 0.99)
    assert [token is None for _, _, token, _ in _nucleus(logits[None], 0.99)][-1]  # the vocabulary form answers
    m = int(kept[0])
    expected = torch.zeros(200, dtype=torch.float64)
    expected[order[0, :m]] = (sorted_p[0, :m] / sorted_p[0, :m].sum()).double()
    n = 150_000
    tokens = project_fast(logits.expand(n, 200), 0.99, torch.Generator().manual_seed(18))
    counts = torch.bincount(tokens, minlength=200).double()
    assert (counts[expected == 0] == 0).all(), "a dropped token was drawn"
    e = n * expected[expected > 0]
    chi2, df = float(((counts[expected > 0] - e) ** 2 / e).sum()), m - 1
    limit = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3  # 1e-4 critical value (Wilson-Hilferty)
    assert chi2 < limit, f"chi-square {chi2:.1f} with {df} degrees of freedom"


# -----------------------------------------------------------------------------
# The twin of tess2.project


def sorted_form(logits, top_p):
    """(n,) bool: the positions _nucleus answers in the sort's order (not from a histogram bucket)."""
    out = torch.zeros(len(logits), dtype=torch.bool)
    for positions, _, token, _ in _nucleus(logits, top_p):
        out[positions] = token is not None
    return out


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_project_fast_is_tess2_project_token_for_token_where_it_keeps_the_sorts_order(top_p):
    """Peaked and Zipf logits (the top 64, a histogram-sized top-k): the same token for the same
    generator as the definition. Flat logits (the boundary's bucket): the same kept set (the tests
    above), drawn in vocabulary order: a kept token, another one for the same uniform."""
    g = torch.Generator().manual_seed(20)
    logits = torch.cat([zipf(2.0, 30, g), zipf(1.5, 20, g), zipf(1.2, 10, g), torch.randn(20, V, generator=g)])
    fast = project_fast(logits, top_p, torch.Generator().manual_seed(21))
    plain = tess2.project(logits, top_p, torch.Generator().manual_seed(21))
    in_order = sorted_form(logits, top_p)
    assert in_order[:50].all()  # Zipf 1.2 may need the bucket at high top_p
    assert torch.equal(fast[in_order], plain[in_order])
    probs, sorted_p, _, kept = definition(logits, top_p)
    boundary = sorted_p.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)  # the least kept probability
    chosen = probs.gather(1, fast.unsqueeze(1)).squeeze(1)
    assert (chosen >= boundary).all()  # every token drawn is in the kept set
    if not in_order.all():
        assert not torch.equal(fast[~in_order], plain[~in_order])  # the vocabulary order draws others


def test_project_fast_is_tess2_project_on_bf16_ties_and_the_full_sort():
    """Where tokens tie (bf16 logits, logits of four values: the full sort), the draw lands on a
    token of the same probability as the definition's."""
    g = torch.Generator().manual_seed(22)
    for logits in (zipf(1.5, 20, g).bfloat16(), torch.randint(0, 4, (4, V), generator=g).float()):
        fast = project_fast(logits, 0.9, torch.Generator().manual_seed(23))
        plain = tess2.project(logits, 0.9, torch.Generator().manual_seed(23))
        probs = torch.softmax(logits.float(), -1)
        in_order = sorted_form(logits, 0.9)
        assert in_order.any()
        assert torch.equal(probs.gather(1, fast[:, None])[in_order], probs.gather(1, plain[:, None])[in_order])


def test_project_fast_refuses_what_tess2_project_refuses():
    for bad in (math.nan, math.inf):
        logits = torch.randn(3, 10)
        logits[1, 5] = bad
        for f in (project_fast, tess2.project):
            with pytest.raises(ValueError, match="finite logits"):
                f(logits, 0.9, torch.Generator().manual_seed(0))
    for f in (project_fast, tess2.project):
        with pytest.raises(ValueError, match="top_p"):
            f(torch.randn(2, 5), top_p=1.5)


# -----------------------------------------------------------------------------
# Span positions only: re-noising (Eq. 4) and the projection (Eq. 5), row by row

K = tess2.SIMPLEX_VALUE


def test_span_positions_are_a_slice_for_one_run_and_indices_for_gaps():
    span = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    run, gaps, none = span_positions(span)
    assert run == slice(2, 5)
    assert gaps.tolist() == [1, 3, 4]
    assert none.tolist() == []


def test_renoising_on_span_positions_draws_each_rows_span_in_order_and_leaves_the_rest():
    """renoise_spans_ is tess2.renoise (Eq. 4) in S's buffer, restated: S = sqrt(a) (2k one-hot - k)
    + sqrt(1 - a) k eps, with row b's own alpha_bar a and its eps one (n_span, V) draw from its
    generator placed at its span positions in order (one run or several gaps); other positions of S
    keep what they held."""
    g = torch.Generator().manual_seed(1)
    tokens, alpha_bar = torch.randint(30, (2, 7), generator=g), [0.37, 0.81]
    span = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0, 0]], dtype=torch.bool)  # a run; two gaps
    S = torch.randn(2, 7, 30, generator=g)
    before = S.clone()
    out = renoise_spans_(S, tokens, alpha_bar, tess2.row_generators([5, 6]), span_positions(span))
    assert out.data_ptr() == S.data_ptr()
    eps = torch.zeros(2, 7, 30)
    for b, seed in enumerate([5, 6]):
        eps[b, span[b]] = torch.empty(int(span[b].sum()), 30).normal_(generator=torch.Generator().manual_seed(seed))
        S_hat = 2 * K * F.one_hot(tokens[b, span[b]], 30).float() - K
        expected = math.sqrt(alpha_bar[b]) * S_hat + math.sqrt(1 - alpha_bar[b]) * K * eps[b, span[b]]
        torch.testing.assert_close(out[b, span[b]], expected, rtol=1e-6, atol=1e-5)
    twin = tess2.renoise(tokens, eps, torch.tensor(alpha_bar))  # the definition, on the whole rows
    torch.testing.assert_close(out[span], twin[span], rtol=1e-6, atol=1e-5)
    assert torch.equal(out[~span], before[~span])


def test_deterministic_renoising_on_span_positions_is_tess2_renoise_ddim():
    """renoise_ddim_spans_ (c S + d S_hat in S's buffer) equals the definition at span positions, with the
    first step's alpha_bar_t = 0, for the rows asked (a run and gaps); the rest of S is left as it was.
    Tolerance: the same three products of fp32 values (|S| <= ~30) associated otherwise, a few ulps."""
    g = torch.Generator().manual_seed(3)
    tokens, S = torch.randint(30, (3, 7), generator=g), 5 * torch.randn(3, 7, 30, generator=g)
    span = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    a_t, a_prev = [0.0, 0.45, 0.3], [0.1, 0.7, 0.5]
    before = S.clone()
    out = renoise_ddim_spans_(S, tokens, a_t, a_prev, span_positions(span), rows=[0, 1])
    assert out.data_ptr() == S.data_ptr()
    twin = tess2.renoise_ddim(tokens, before, torch.tensor(a_t), torch.tensor(a_prev))
    torch.testing.assert_close(out[:2][span[:2]], twin[:2][span[:2]], rtol=1e-6, atol=1e-5)
    assert torch.equal(out[:2][~span[:2]], before[:2][~span[:2]]) and torch.equal(out[2], before[2])  # row 2: not asked


def test_project_spans_draws_each_rows_span_from_its_generator_or_takes_its_argmax():
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(3, 6, 40, generator=g)
    span = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 1, 0]], dtype=torch.bool)
    ids = torch.randint(40, (3, 6), generator=g)
    best = torch.where(span, logits.argmax(-1), ids)
    where = span_positions(span)
    tokens = project_spans(logits, best, where, [0.9, None, 0.5], tess2.row_generators([1, 2, 3]))
    assert torch.equal(tokens[~span], ids[~span])  # context positions: left as best holds them
    assert torch.equal(tokens[1], best[1])  # top_p None: the argmax
    for b, top_p, seed in ((0, 0.9, 1), (2, 0.5, 3)):
        assert torch.equal(tokens[b, span[b]], project_fast(logits[b, span[b]], top_p,
                                                            torch.Generator().manual_seed(seed)))
