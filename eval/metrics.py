"""
Metrics of the paper's adaptation evaluation (Sec. 4.1, App. D; METHOD.md §11), as plain functions:
distinct-n, unigram entropy, perplexity of continuations under a held-out AR model, mean reward.

Text metrics count whitespace-separated words over the whole set of generations (corpus level),
so they do not depend on the diffusion model's tokenizer.
"""
import math
from collections import Counter

import torch
import torch.nn.functional as F


def ngrams(words: list[str], n: int):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams over every text (0 when there are none)."""
    grams = [g for text in texts for g in ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unigram_entropy(texts: list[str]) -> float:
    """Entropy in nats of the word unigram distribution over every text."""
    counts = Counter(w for text in texts for w in text.split())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


@torch.no_grad()
def perplexity(model, prompts: list[list[int]], continuations: list[list[int]], batch_size: int = 8) -> float:
    """
    exp(mean negative log-likelihood per continuation token) under a causal LM (our Transformer
    with an LM head), each continuation scored given its prompt. Token lists are ids of the AR
    model's tokenizer; rows are right-padded and the padding is never scored or attended to.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    device = model.embed_tokens.weight.device
    nll, count = 0.0, 0
    pairs = [(p, c) for p, c in zip(prompts, continuations) if c]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        L = max(len(p) + len(c) for p, c in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        targets = torch.full((len(chunk), L), -100, dtype=torch.long)
        for b, (p, c) in enumerate(chunk):
            seq = torch.tensor(p + c)
            ids[b, :len(seq)] = seq
            targets[b, len(p) - 1:len(seq) - 1] = torch.tensor(c)  # position j predicts token j+1
        logits = model(ids.to(device), causal=True)  # (B, L, V)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(),
                               ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("no continuation tokens to score")
    return math.exp(nll / count)


@torch.no_grad()
def mean_reward(reward_model, sequences: list[list[int]], pad_id: int, batch_size: int = 8) -> float:
    """Mean scalar reward of token sequences, each read at its last real token (right padding)."""
    device = reward_model.embed_tokens.weight.device
    total = 0.0
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        L = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        for b, s in enumerate(chunk):
            ids[b, :len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s in chunk])
        total += reward_model(ids.to(device), causal=True, last_index=last.to(device)).float().sum().item()
    return total / len(sequences)
