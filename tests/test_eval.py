"""The evaluation metrics against values worked out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from eval.metrics import distinct_n, mean_reward, perplexity, unigram_entropy
from model import Transformer, preset


def test_distinct_n_counts_unique_ngrams_over_all_texts():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique of 7; bigrams: ab ba ab | ab bc -> {ab, ba, bc} 3 of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 4) == pytest.approx(1 / 1)  # only "a b a b"
    assert distinct_n(["a"], 2) == 0.0


def test_unigram_entropy_in_nats():
    assert unigram_entropy(["x x x x"]) == 0.0
    assert unigram_entropy(["a b", "c d"]) == pytest.approx(math.log(4))
    # p = (1/2, 1/4, 1/4)
    assert unigram_entropy(["a a b c"]) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def tiny(head="lm"):
    torch.manual_seed(0)
    return Transformer(preset("tiny", head=head)).init_weights().eval()


def test_perplexity_is_exp_mean_nll_of_continuations_only():
    model = tiny()
    prompts, conts = [[1, 5, 6], [1, 9]], [[7, 8], [10, 11, 12]]
    nll, n = 0.0, 0
    for p, c in zip(prompts, conts):  # one row at a time, no padding: the reference
        ids = torch.tensor([p + c])
        logp = F.log_softmax(model(ids, causal=True)[0].float(), -1)
        for j, tok in enumerate(c):
            nll -= logp[len(p) - 1 + j, tok].item()
            n += 1
    assert perplexity(model, prompts, conts, batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-5)
    # batching (and so padding) does not change it
    assert perplexity(model, prompts, conts, batch_size=1) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_perplexity_refuses_mismatched_or_empty_input():
    model = tiny()
    with pytest.raises(ValueError, match="continuations"):
        perplexity(model, [[1]], [])
    with pytest.raises(ValueError, match="no continuation"):
        perplexity(model, [[1]], [[]])


def test_mean_reward_reads_each_sequence_at_its_last_real_token():
    rm = tiny("score")
    seqs = [[1, 5, 6, 2], [1, 9, 2]]
    alone = [rm(torch.tensor([s]), causal=True).item() for s in seqs]
    assert mean_reward(rm, seqs, pad_id=0, batch_size=2) == pytest.approx(sum(alone) / 2, rel=1e-5)


def test_mean_reward_is_over_sequences_whatever_the_batch_size():
    """3 sequences in batches of 2 (a full one and a last one of 1): the mean of the 3 rewards."""
    rm = tiny("score")
    seqs = [[1, 5, 6, 2], [1, 9, 2], [1, 7, 8, 9, 10, 2]]
    alone = [rm(torch.tensor([s]), causal=True).item() for s in seqs]
    for batch_size in (1, 2, 5):
        assert mean_reward(rm, seqs, pad_id=0, batch_size=batch_size) == pytest.approx(sum(alone) / 3, rel=1e-5)
