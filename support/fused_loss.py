"""
The training diffusion loss computed where it is read: the fused twin of tess2.diffusion_loss,
with its value and gradients (tests/test_fused_loss.py proves them equal), computing the LM head,
the cross-entropy and p @ E at span positions only.

tess2.predict makes (B, L, V) tensors at every position: the noisy simplex, its softmax, the
self-conditioning logits and the logits. The loss reads logits only at span positions j >= 1
(METHOD.md §5), the self-conditioning logits only where they are mixed into p (span positions,
§6), and context positions take clean embeddings whatever S_t is (§4). So here those tensors
are made for the N span positions only, chunk_rows() rows at a time, and the head + cross-entropy
never holds more than one (chunk, V) block of logits (LinearCrossEntropy).
train.Objective uses it for adapt and sft; its figures are in BENCHMARKS.md.
"""
import torch
import torch.nn.functional as F

import tess2

# Bytes of one (chunk, V) fp32 block of logits, the unit of work of the head and the cross-entropy.
# CPU: near the caches, 16 MiB (131 rows at V 32001). CUDA: each chunk is three GEMMs of
# chunk x D x V plus a read-modify-write of the fp32 (V, D) weight gradient (~1.3 GB of traffic at
# Mistral-7B's D 4096, ~0.3 ms on an H200): a 131-row chunk's GEMMs (~0.13 ms at 790 TFLOP/s) cannot
# hide it. 512 MiB blocks (4194 rows at V 32001, two 2048-token rows of span) make it ~8% of the
# GEMMs' time for ~2.5 GB of transient blocks (logits, their gradient, the span softmaxes). These
# times are arithmetic from the H200's 790 TFLOP/s and 4.8 TB/s, not a measurement.
BLOCK_BYTES = {"cpu": 2**24, "cuda": 2**29}


def chunk_rows(vocab_size, device):
    """Span positions per chunk: one (chunk, V) fp32 block of BLOCK_BYTES for the device's type
    (a device type not listed gets the CPU's), and at least 64 rows."""
    budget = BLOCK_BYTES.get(torch.device(device).type, BLOCK_BYTES["cpu"])
    return max(64, budget // (4 * vocab_size))


def matmul_dtype(device, dtype):
    """The dtype the matrix products run in: autocast's (bf16) where it is on, else `dtype`."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


class LinearCrossEntropy(torch.autograd.Function):
    """sum_n w_n * CE(h_n @ W^T, y_n) for h (N, D), W (V, D), targets y (N,), weights w (N,), `chunk` rows
    at a time. head: W detached in the products' dtype (under autocast, cast once by the caller, not
    per chunk); W itself receives the gradient. The gradients are computed in the forward, chunk by
    chunk, so only one (chunk, V) block of logits is ever alive and none is kept for backward (which
    scales the stored gradients: the loss is a scalar). The same three matrix products as autograd's
    linear + cross-entropy, no recomputation."""

    @staticmethod
    def forward(ctx, h, W, head, y, w, chunk, need_grad):
        loss = torch.zeros((), device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_W = torch.zeros(W.shape, device=W.device) if need_grad else None  # fp32 accumulator
        for i in range(0, h.size(0), chunk):
            hc, yc, wc = h[i:i + chunk].to(head.dtype), y[i:i + chunk], w[i:i + chunk, None]  # (c, D), (c,), (c, 1)
            logits = (hc @ head.T).float()  # (c, V)
            lse = logits.logsumexp(-1, keepdim=True)  # (c, 1)
            loss += ((lse - logits.gather(1, yc[:, None])) * wc).sum()
            if need_grad:  # d loss / d logits = w (softmax - onehot(y)), made in the logits' buffer
                g = logits.sub_(lse).exp_()
                g.scatter_add_(1, yc[:, None], torch.full_like(wc, -1.0)).mul_(wc)
                g = g.to(head.dtype)  # (c, V): the products run in the head's dtype
                grad_h[i:i + chunk] = g @ head
                grad_W += g.T @ hc  # (V, D)
        ctx.save_for_backward(grad_h, grad_W)
        ctx.W_dtype = W.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_W = ctx.saved_tensors
        grad_W = (grad_W * grad_loss).to(ctx.W_dtype)
        return grad_h * grad_loss.to(grad_h.dtype), grad_W, None, None, None, None, None


def span_noise(seeds, span_mask, vocab_size):
    """eps at the span positions, (N, V) in span_mask's row-major order: row b is drawn whole from its own
    generator, as tess2.row_noise draws it (the same numbers), into one (L, V) buffer, not (B, L, V)."""
    dev = span_mask.device
    buf = torch.empty(1, span_mask.size(1), vocab_size, device=dev)  # (1, L, V)
    out = torch.empty(int(span_mask.sum()), vocab_size, device=dev)  # (N, V)
    n = 0
    for g, m in zip(tess2.row_generators(seeds, dev), span_mask):
        j = m.nonzero().squeeze(1)  # this row's span positions
        torch.index_select(tess2.row_noise_(buf, [g])[0], 0, j, out=out[n:n + j.numel()])
        n += j.numel()
    return out


def span_pass(net, ids, span_mask, eps, t, prev, coin, embed, head, chunk):
    """tess2.predict up to the LM head, with the (B, L, V) work done at the N span positions only, `chunk`
    at a time (eps (N, V) is the noise there). Returns the shifted hidden states (B, L, D): the head
    applied to [b, j] gives predict's logits[b, j]. t (B,) integer timesteps.
    prev: the self-conditioning pass's shifted states (B, L, D) or None (uniform); coin (B,) bool: rows
    whose prev_logits are used (the others get zero logits, i.e. uniform, as in diffusion_loss).
    embed, head: E and the LM head's W (V, D), detached, in the products' dtype."""
    cfg = net.args
    b, j = span_mask.nonzero(as_tuple=True)  # (N,), (N,): row-major, as eps
    alpha = tess2.alpha_bar(t.double() / tess2.NUM_TRAIN_STEPS).float()[b]  # (N,)
    h = net.embed_tokens(ids)  # (B, L, D): context positions read clean E[w]
    parts = []
    with torch.no_grad():  # no gradient flows through the span input (E detached, prev_logits a constant)
        for i in range(0, b.numel(), chunk):
            s = slice(i, i + chunk)
            S_t = tess2.add_noise(ids[b[s], j[s]][:, None], eps[s, None], alpha[s])[:, 0]  # (c, V), Eq. 2
            p = torch.softmax(S_t.float(), dim=-1)  # (c, V)
            if cfg.self_condition == "logits_mean" and cfg.self_condition_mix_before_weights:  # Eq. 8
                if prev is None:
                    p.add_(1.0 / p.size(-1))
                else:
                    prev_logits = (prev[b[s], j[s]].to(head.dtype) @ head.T).masked_fill(~coin[b[s], None], 0.0)
                    p.add_(torch.softmax(prev_logits.float(), dim=-1))  # prev_logits (c, V): the LM head's
                p.mul_(0.5)
            parts.append(p.to(embed.dtype) @ embed)  # (c, D): p @ E, E detached as in predict
    if parts:
        h = h.index_put((b, j), torch.cat(parts).to(h.dtype))
    t_pos = (t / tess2.NUM_TRAIN_STEPS).view(-1, 1).to(h.dtype) * span_mask if cfg.timestep_embed else None  # (B, L)
    hidden = net.hidden_states(embeds=h, t=t_pos)  # (B, L, D)
    return F.pad(hidden[:, :-1], (0, 0, 1, 0))  # label shift, as predict


def diffusion_loss(net, ids, span_mask, t, noise_seeds, self_condition, weights, extra_pass=False):
    """sum_b weights[b] * (row b's summed span cross-entropy) of tess2.diffusion_loss(ids, span_mask, t,
    eps = row_noise(noise_seeds), self_condition) with its gradients, computing the LM head, the
    cross-entropy and p @ E only where the loss reads them (span positions; METHOD.md §5-6): no
    (B, L, V) tensor is made, the largest are eps at the span, (N, V), and one (chunk, V) block.
    extra_pass: run the self-conditioning pass even when no row's coin asks for it (FSDP: every rank
    must run the same passes, since each gathers the weights together with the others)."""
    B, T, dev = ids.size(0), tess2.NUM_TRAIN_STEPS, ids.device
    chunk = chunk_rows(net.args.vocab_size, dev)
    W, E = net.lm_head.weight, net.embed_tokens.weight  # (V, D) each; one tensor when tied
    dtype = matmul_dtype(dev, W.dtype)
    with torch.no_grad():  # the products' copies, made once per call (under autocast, else no copy)
        head = W.detach().to(dtype)  # (V, D)
        embed = head if E is W else E.detach().to(dtype)  # (V, D)
    eps = span_noise(noise_seeds, span_mask, net.args.vocab_size)  # (N, V)
    coin = torch.as_tensor(self_condition, dtype=torch.bool).expand(B).to(dev)  # (B,)
    prev = None
    if extra_pass or bool(torch.as_tensor(self_condition).any()):  # Sec. 3.1: at t+1, same noise, no grad
        with torch.no_grad():
            prev = span_pass(net, ids, span_mask, eps, (t + 1).clamp(max=T - 1), None, coin, embed, head, chunk)
    hidden = span_pass(net, ids, span_mask, eps, t, prev, coin, embed, head, chunk)  # (B, L, D)
    del eps, prev
    target_b, target_j = (span_mask & (torch.arange(ids.size(1), device=dev) > 0)).nonzero(as_tuple=True)  # j >= 1
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or W.requires_grad)
    return LinearCrossEntropy.apply(hidden[target_b, target_j], W, head, ids[target_b, target_j],
                                    weights.float()[target_b], chunk, need_grad)
