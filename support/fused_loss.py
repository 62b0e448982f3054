"""
The training diffusion loss computed where it is read: tess2.diffusion_loss's value and gradients
(tested equal) with the LM head, the cross-entropy and p @ E at span positions only.

tess2.predict makes (B, L, V) tensors at every position: the noisy simplex, its softmax, the
self-conditioning logits and the logits. The loss reads logits only at span positions j >= 1
(METHOD.md §5), the self-conditioning logits only where they are mixed into p (span positions,
§6), and context positions take clean embeddings whatever S_t is (§4). So here those tensors
are made for the N span positions only, `chunk` rows at a time, and the head + cross-entropy
never holds more than one (chunk, V) block of logits (LinearCrossEntropy).
train.Objective uses it for adapt and sft; its figures are in BENCHMARKS.md.
"""
import torch
import torch.nn.functional as F

import tess2


class LinearCrossEntropy(torch.autograd.Function):
    """sum_n w_n * CE(h_n @ W^T, y_n) for h (N, D), W (V, D), targets y (N,), weights w (N,), `chunk` rows
    at a time. The gradients are computed in the forward, chunk by chunk, so only one (chunk, V) block of
    logits is ever alive and none is kept for backward (which scales the stored gradients: the loss is a
    scalar). The same three matrix products as autograd's linear + cross-entropy, no recomputation."""

    @staticmethod
    def forward(ctx, h, W, y, w, chunk, need_grad):
        loss = torch.zeros((), device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_W = torch.zeros(W.shape, device=W.device) if need_grad else None  # fp32 accumulator
        for i in range(0, h.size(0), chunk):
            hc, yc, wc = h[i:i + chunk], y[i:i + chunk], w[i:i + chunk, None]  # (c, D), (c,), (c, 1)
            logits = (hc.to(W.dtype) @ W.T).float()  # (c, V)
            lse = logits.logsumexp(-1, keepdim=True)  # (c, 1)
            loss += ((lse - logits.gather(1, yc[:, None])) * wc).sum()
            if need_grad:  # d loss / d logits = w (softmax - onehot(y)), made in the logits' buffer
                g = logits.sub_(lse).exp_()
                g.scatter_add_(1, yc[:, None], torch.full_like(wc, -1.0)).mul_(wc)
                g = g.to(W.dtype)  # under autocast the products run in bf16 all the same
                grad_h[i:i + chunk] = g @ W
                grad_W += g.T @ hc  # (V, D)
        ctx.save_for_backward(grad_h, grad_W)
        ctx.W_dtype = W.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_W = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), (grad_W * grad_loss).to(ctx.W_dtype), None, None, None, None


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


def span_pass(net, ids, span_mask, eps, t, prev, coin, chunk):
    """tess2.predict up to the LM head, with the (B, L, V) work done at the N span positions only, `chunk`
    at a time (eps (N, V) is the noise there). Returns the shifted hidden states (B, L, D): the head
    applied to [b, j] gives predict's logits[b, j]. t (B,) integer timesteps.
    prev: the self-conditioning pass's shifted states (B, L, D) or None (uniform); coin (B,) bool: rows
    whose prev_logits are used (the others get zero logits, i.e. uniform, as in diffusion_loss)."""
    a, E = net.args, net.embed_tokens.weight  # E: (V, D)
    b, j = span_mask.nonzero(as_tuple=True)  # (N,), (N,): row-major, as eps
    alpha = tess2.alpha_bar(t.double() / tess2.NUM_TRAIN_STEPS).float()[b]  # (N,)
    h = net.embed_tokens(ids)  # (B, L, D): context positions read clean E[w]
    parts = []
    with torch.no_grad():  # no gradient flows through the span input (E detached, prev_logits a constant)
        for i in range(0, b.numel(), chunk):
            s = slice(i, i + chunk)
            S_t = tess2.add_noise(ids[b[s], j[s]][:, None], eps[s, None], alpha[s])[:, 0]  # (c, V), Eq. 2
            p = torch.softmax(S_t.float(), dim=-1)  # (c, V)
            if a.self_condition == "logits_mean" and a.self_condition_mix_before_weights:  # Eq. 8
                if prev is None:
                    p.add_(1.0 / p.size(-1))
                else:
                    prev_logits = net.lm_head(prev[b[s], j[s]]).masked_fill(~coin[b[s], None], 0.0)  # (c, V)
                    p.add_(torch.softmax(prev_logits.float(), dim=-1))
                p.mul_(0.5)
            parts.append(p.to(E.dtype) @ E.detach())  # (c, D): p @ E, E detached as in predict
    if parts:
        h = h.index_put((b, j), torch.cat(parts).to(h.dtype))
    t_pos = (t / tess2.NUM_TRAIN_STEPS).view(-1, 1).to(h.dtype) * span_mask if a.timestep_embed else None  # (B, L)
    hidden = net.hidden_states(embeds=h, t=t_pos)  # (B, L, D)
    return F.pad(hidden[:, :-1], (0, 0, 1, 0))  # label shift, as predict


def diffusion_loss(net, ids, span_mask, t, noise_seeds, self_condition, weights, extra_pass=False,
                   chunk=None):
    """sum_b weights[b] * (row b's summed span cross-entropy) of tess2.diffusion_loss(ids, span_mask, t,
    eps = row_noise(noise_seeds), self_condition) with its gradients, computing the LM head, the
    cross-entropy and p @ E only where the loss reads them (span positions; METHOD.md §5-6): no
    (B, L, V) tensor is made, the largest are eps at the span, (N, V), and one (chunk, V) block."""
    B, T = ids.size(0), tess2.NUM_TRAIN_STEPS
    chunk = chunk or max(64, 2**22 // net.args.vocab_size)  # (chunk, V) fp32 blocks of 16 MiB: 131 rows at V 32001
    eps = span_noise(noise_seeds, span_mask, net.args.vocab_size)  # (N, V)
    coin = torch.as_tensor(self_condition, dtype=torch.bool).expand(B).to(ids.device)  # (B,)
    prev = None
    if extra_pass or bool(torch.as_tensor(self_condition).any()):  # Sec. 3.1: at t+1, same noise, no grad
        with torch.no_grad():
            prev = span_pass(net, ids, span_mask, eps, (t + 1).clamp(max=T - 1), None, coin, chunk)
    hidden = span_pass(net, ids, span_mask, eps, t, prev, coin, chunk)  # (B, L, D)
    del eps, prev
    tb, tj = (span_mask & (torch.arange(ids.size(1), device=ids.device) > 0)).nonzero(as_tuple=True)  # j >= 1
    W = net.lm_head.weight  # (V, D)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or W.requires_grad)
    return LinearCrossEntropy.apply(hidden[tb, tj], W, ids[tb, tj], weights.float()[tb], chunk, need_grad)
