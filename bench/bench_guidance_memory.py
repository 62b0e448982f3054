"""
Memory of reward guidance's backward: what autograd keeps for it, measured on the CPU with the
reward model's real layer sizes (Mistral-7B: hidden 4096, FFN 14336, 32/8 heads) but few layers
and few tokens, then scaled to the paper's batch (8 x 2048 tokens, 32 layers, V = 32001).

    python bench/bench_guidance_memory.py [--tokens 256]

Three ways: weights requiring grad (as loaded for training), weights frozen, frozen plus
per-block recomputation (sample.py's choice where what the backward keeps would not fit in the
device's free memory: sample.recompute_reward_model, whose per-token estimate comes from here).
Bytes kept for backward are summed from autograd's saved-tensor hooks (parameters excluded: they
exist anyway), with 1 and 2 layers: the difference is one layer's share, the rest is the embedding
and head's. The (B, L, V) tensors are counted apart, at V = 32001 (4 fp32 ones: the logits being
guided, their softmax, its gradient, the self-conditioning logits).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tess2  # noqa: E402
from model import Transformer, preset  # noqa: E402


def kept_bytes(rm, tokens, V, dtype):
    params = {p.data_ptr() for p in rm.parameters()}
    seen, total = set(), [0]

    def pack(x):
        if x.data_ptr() not in params and x.data_ptr() not in seen:
            seen.add(x.data_ptr())
            total[0] += x.numel() * x.element_size()
        return x
    ids = torch.randint(V, (1, tokens))
    span = torch.arange(tokens)[None] >= tokens // 4
    logits = torch.randn(1, tokens, V)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        tess2.reward_guidance(rm, logits, ids, span, eta=0.25)
    return total[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(1)
    V, dtype = 1024, torch.bfloat16  # a small vocabulary here; the (B, L, V) tensors are counted apart
    table = []
    for name, frozen, ckpt in (("weights require grad", False, False), ("weights frozen", True, False),
                               ("frozen + per-block recomputation", True, True)):
        kept = []
        for layers in (1, 2):
            torch.manual_seed(0)
            rm = Transformer(preset("mistral-7b", num_hidden_layers=layers, vocab_size=V, head="score"))
            rm = rm.to(dtype).init_weights().eval().requires_grad_(not frozen)
            rm.gradient_checkpointing = ckpt
            kept.append(kept_bytes(rm, a.tokens, V, dtype) / a.tokens)
        table.append((name, kept[1] - kept[0], 2 * kept[0] - kept[1]))  # per layer, the rest
    tokens_7b, layers_7b, V_7b = 8 * 2048, 32, 32001
    weights = 2 * 7.24e9 * 2  # diffusion model and reward model, bf16
    blv = 4 * tokens_7b * V_7b * 4
    print(f"measured with 1 and 2 layers of Mistral-7B size, {a.tokens} tokens, bf16\n")
    print("| reward model in the guidance backward | kept per token per layer | activations at 8 x 2048 x 32 "
          "layers | with both models' bf16 weights and the (B, L, V) tensors |")
    print("| --- | --- | --- | --- |")
    for name, per_layer, rest in table:
        acts = (per_layer * layers_7b + rest) * tokens_7b
        if "recomputation" in name:  # plus one block's activations while it is recomputed
            acts += table[1][1] * tokens_7b
        print(f"| {name} | {per_layer / 1024:.1f} KiB | {acts / 1e9:.1f} GB | {(acts + weights + blv) / 1e9:.1f} GB |")

if __name__ == "__main__":
    main()
