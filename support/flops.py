"""
FLOPs per token of what a step really does: the one count behind the MFU that train.py logs and
every benchmark reports (bench/bench_train.py, bench/gpu_*.py).

    python -m support.flops     # its parts at Mistral-7B's layer size: training at 4 and 32 layers, a sampler step

Counted: matrix products, 2 FLOPs per multiply-add, as torch.utils.flop_counter counts them
(tests/test_flops.py checks this count against FlopCounterMode on the real training step).
Not counted: element-wise work (softmaxes, the cross-entropy's log-sum-exp, RMSNorm, RoPE, SiLU,
drawing the noise, AdamW), the embedding lookup (a gather) and recomputation under --grad-ckpt.
Attention is QK^T and AV over the full L x L, causal or not (what FlopCounterMode and the usual
MFU count; a causal flash kernel skips the masked half).

A diffusion training step (support/fused_loss.py) runs, per token of a row of length L:
  - the network forward and backward (3 x 2 per weight of the blocks; attention likewise 3x),
    plus, on the share `self_condition` of steps that self-condition, one more forward without
    gradient (Sec. 3.1: train.py draws a coin per sequence, 0.5, and runs the pass for a whole
    micro-batch if any of its rows needs it);
  - at span positions only (the share `span_fraction` of the row): p @ E (forward only: E is read
    detached), the LM head with its two gradients (6 V D), and in a self-conditioning step p @ E
    again and the head once more for the previous logits (no gradient).
A sampler step (stage "sample", tess2.predict) runs the network forward, p @ E and the head at
every position; reward guidance adds, per gradient step, the reward model's forward, its backward
to the input only (its weights are frozen), p @ E_rm both ways, and with recomputation
(sample.py's default on CUDA) one more forward of its blocks (less their down projections).

"Tokens/s per layer scales" is false: the head, the cross-entropy, p @ E and the noise cost the
same per token whatever the number of layers. In FLOPs alone the head and p @ E are about 9% of a
4-layer Mistral-7B-sized adapt step and about 1% of a 32-layer one (`python -m support.flops`);
in time the share is larger, as the noise, the softmaxes and the cross-entropy are element-wise
work over V per span token (bench/gpu_train.py measures it from two layer counts).
"""
STAGES = ("adapt", "sft", "rm", "ar", "sample")


def block_params(args, n_params):
    """The weights used in matrix products inside the network: n_params less the embedding matrix,
    the head (the LM head when untied, or the score head) and the RMSNorm weights. What remains is
    the blocks' projections and the timestep embedding."""
    V, D = args.vocab_size, args.hidden_size
    head = V * D if args.head == "lm" and not args.tie_word_embeddings else D if args.head == "score" else 0
    return n_params - V * D - head - D * (2 * args.num_hidden_layers + 1)


def attention_flops(args, seq_len):
    """QK^T and AV of one forward pass, per token, all layers: 2 products of L x (heads x head_dim)."""
    return 4 * args.num_hidden_layers * seq_len * args.num_attention_heads * args.head_dim


def ul2_span_share(seq_len):
    """The expected share of span positions in tess2.ul2_mask(seq_len) with the released prefix rule
    (train.py's default): the mean of T5 at 15% and at 50% (int(L x density) positions, clamped to
    [1, L - 1]) and the prefix-LM objective, whose BOS + n positions are context with n uniform in
    [1, (L - 1) // 2) (n = 1 below L = 5)."""
    L = seq_len
    t5 = lambda density: min(max(int(L * density), 1), L - 1)  # noqa: E731
    prefix_span = L - 1 - ((L - 1) // 2) / 2 if L >= 5 else L - 2  # mean of L - 1 - n
    return (t5(0.15) + t5(0.5) + prefix_span) / (3 * L)


def guidance_flops(rm_args, rm_n_params, seq_len, recompute=True):
    """One gradient step of reward guidance (tess2.reward_guidance), per token: p @ E_rm and its
    gradient (every position), the reward model's forward, its backward to the input only (frozen
    weights: one product per weight, two per attention product), and with recomputation of its
    blocks one more forward of them but for the MLP's down projection: torch's non-reentrant
    checkpoint stops once every tensor saved for the backward is back, and with frozen weights
    nothing saves that product's output. The score head reads one position per row."""
    V, D = rm_args.vocab_size, rm_args.hidden_size
    blocks, attention = 2 * block_params(rm_args, rm_n_params), attention_flops(rm_args, seq_len)
    score = 2 * D / seq_len
    forward = blocks + attention + score
    backward = blocks + 2 * attention + score
    down = 2 * rm_args.num_hidden_layers * D * rm_args.intermediate_size
    return 4 * V * D + forward + backward + (blocks - down + attention if recompute else 0)


def flop_parts(args, n_params, seq_len, stage, span_fraction=None, self_condition=None, reward=None,
               guidance_steps=1, recompute=True):
    """FLOPs per token of one step of `stage` (adapt, sft, rm, ar: a training step, forward +
    backward; sample: one step of the reverse process), by part: layers, attention, head, p_at_E,
    and guidance. args: the model's ModelArgs, n_params: its num_params(), seq_len: L.
    span_fraction: the share of positions that are span (adapt default: ul2_span_share(L); sft
    default 1.0, an upper bound: pass the batches' real share). self_condition: the share of
    training steps that run the self-conditioning pass (default 0.5; pass 1 or 0 when pinned).
    reward = (rm_args, rm_n_params) adds reward guidance to a sampler step: guidance_steps gradient
    steps, recompute: the reward model's blocks recomputed in the backward."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    V, D, L = args.vocab_size, args.hidden_size, seq_len
    layers, attention = 2 * block_params(args, n_params), attention_flops(args, L)  # one forward pass
    if stage == "sample":
        guide = guidance_steps * guidance_flops(*reward, L, recompute) if reward else 0.0
        return dict(layers=layers, attention=attention, head=2 * V * D, p_at_E=2 * V * D, guidance=guide)
    if stage in ("rm", "ar"):  # ar: the head at every position; rm: the score head at one per sequence
        head = 6 * V * D if stage == "ar" else 6 * D / L
        return dict(layers=3 * layers, attention=3 * attention, head=head, p_at_E=0.0, guidance=0.0)
    if span_fraction is None:
        span_fraction = ul2_span_share(L) if stage == "adapt" else 1.0
    sc = 0.5 if self_condition is None else self_condition
    return dict(layers=(3 + sc) * layers, attention=(3 + sc) * attention,
                head=(6 + 2 * sc) * V * D * span_fraction, p_at_E=(1 + sc) * 2 * V * D * span_fraction,
                guidance=0.0)


def flops_per_token(args, n_params, seq_len, stage, **kw):
    """The sum of flop_parts(args, n_params, seq_len, stage, **kw): FLOPs per token of one step."""
    return sum(flop_parts(args, n_params, seq_len, stage, **kw).values())


def fixed_share(parts):
    """The share of a step's FLOPs that does not grow with the layers: the head and p @ E."""
    return (parts["head"] + parts["p_at_E"]) / sum(parts.values())


def main():
    import torch
    from model import Transformer, preset

    def model(name, layers, **kw):  # on the meta device: its shape and parameter count, no memory
        with torch.device("meta"):
            net = Transformer(preset(name, num_hidden_layers=layers, **kw))
        return net.args, net.num_params()

    L = 2048
    print(f"adapt step, Mistral-7B layer size, V 32001, L {L}, self-conditioning share 0.5, "
          f"span share {ul2_span_share(L):.3f} (UL2, released prefix)")
    print("| layers | FLOPs per token | head + p @ E per token | their share |")
    print("| --- | --- | --- | --- |")
    for layers in (4, 32):
        parts = flop_parts(*model("tess2-7b", layers), L, "adapt")
        print(f"| {layers} | {sum(parts.values()):.4g} | {parts['head'] + parts['p_at_E']:.4g} | "
              f"{fixed_share(parts):.1%} |")
    args, n = model("tess2-7b", 32)
    rm = model("mistral-7b", 32, vocab_size=32001, head="score")
    tokens = 8 * L
    print(f"\nsampler step, 8 x {L} tokens, {n:.5g} parameters (tess2-7b, 32 layers)")
    for label, kw in (("unguided", {}), ("guided, G = 1, reward model recomputed", dict(reward=rm)),
                      ("guided, G = 1, no recomputation", dict(reward=rm, recompute=False))):
        flops = flops_per_token(args, n, L, "sample", **kw) * tokens
        print(f"{label}: {flops:.4g} FLOPs; 100 steps at 790 TFLOP/s: {100 * flops / 790e12:.1f} s")


if __name__ == "__main__":
    main()
