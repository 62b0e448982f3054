"""
(d) Which scaled_dot_product_attention kernel each kind of call gets, at the paper's shape (8 x 2048,
32 query heads over 8 key-value heads of 128, bf16): bidirectional without a mask (sampling), causal
forward + backward (ar and rm training), with a boolean key-padding mask (rows of different lengths)
over grouped K/V and over K/V expanded to every head; and the model's own attention
(model.hidden_states, one layer, with and without key_padding_mask). For each: the kernel the
default dispatch ran (the aten op the profiler saw) and its time, then each backend alone under
torch.nn.attention.sdpa_kernel: accepted (and its time) or refused (and why: the first line of the
error or warning). A masked call that only MATH accepts is the silent fall to the math kernel:
(B, heads, L, L) fp32 scores, several times slower.
"""
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gpu_common
from model import preset

BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
KERNELS = ("flash", "efficient", "cudnn", "math", "overrideable")  # in aten's op names


def kernel_ran(f):
    """The SDPA kernels (by name) the profiler saw while f() ran: forward and backward ops alike."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        f()
    ops = {e.key for e in prof.key_averages() if "dot_product" in e.key or "attention" in e.key}
    seen = sorted({k for op in ops for k in KERNELS if k in op and "scaled_dot_product" in op})
    return ", ".join(seen) or "none: " + ", ".join(sorted(ops))[:200]


def calls(s, B, L, nh, nkv, hd):
    """label -> f(): the raw SDPA calls, on random q (B, nh, L, hd) and k, v (B, nkv, L, hd)."""
    g = torch.Generator(device=s.dev).manual_seed(0)
    q = torch.randn(B, nh, L, hd, generator=g, device=s.dev).to(s.dtype)
    k, v = (torch.randn(B, nkv, L, hd, generator=g, device=s.dev).to(s.dtype) for _ in range(2))
    lengths = torch.tensor([L - (L // 16) * (b % 4) for b in range(B)], device=s.dev)  # rows of 4 lengths
    real = torch.arange(L, device=s.dev) < lengths[:, None]  # (B, L)
    mask = real[:, None, None, :] | torch.eye(L, dtype=torch.bool, device=s.dev)  # (B, 1, L, L), as the model makes it
    k_all, v_all = (x.repeat_interleave(nh // nkv, dim=1) for x in (k, v))  # (B, nh, L, hd)
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    grad = torch.randn_like(q)

    def causal_train():
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True).backward(grad)
    return {"bidirectional, no mask, grouped K/V (enable_gqa)":
            lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            "causal, grouped K/V, forward + backward": causal_train,
            "bidirectional, bool key-padding mask, grouped K/V (enable_gqa)":
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            "bidirectional, bool key-padding mask, K/V expanded to every head":
            lambda: F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)}


def model_calls(s, B, L, small):
    """label -> f(): the model's own attention path, one layer of the section's size."""
    args = (preset("tiny", num_hidden_layers=1, causal=False) if small else
            preset("tess2-7b", num_hidden_layers=1))
    net = s.random_model(args)
    g = torch.Generator(device=s.dev).manual_seed(1)
    ids = torch.randint(3, args.vocab_size, (B, L), generator=g, device=s.dev)
    lengths = torch.tensor([L - (L // 16) * (b % 4) for b in range(B)], device=s.dev)
    padded = torch.arange(L, device=s.dev) < lengths[:, None]  # (B, L): rows of 4 lengths
    with torch.no_grad():
        return {"model.hidden_states, 1 layer, bidirectional": lambda: net.hidden_states(ids, causal=False),
                "model.hidden_states, 1 layer, key_padding_mask": lambda: net.hidden_states(
                    ids, causal=False, key_padding_mask=padded)}


def alone(s, f):
    """f under each backend alone: 'yes, X ms' or 'no: why'."""
    cells, reasons = [], {}
    for backend in BACKENDS:
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
            warnings.simplefilter("always")
            try:
                cells.append(f"yes, {s.median_ms(f, reps=5, warmup=1):.2f} ms")
            except RuntimeError as e:
                why = [str(w.message).strip().splitlines()[0] for w in caught] + [str(e).strip().splitlines()[0]]
                cells.append("no")
                reasons[backend.name] = "; ".join(dict.fromkeys(why))[:400]
    return cells, reasons


def main():
    a = gpu_common.parser(__doc__).parse_args()
    s = gpu_common.Section(a, "d-attention", "(d) The attention kernel of each kind of call")
    B, L, nh, nkv, hd = (1, 64, 4, 2, 16) if a.cpu_smoke else (8, 2048, 32, 8, 128)
    s.write(f"\nq ({B}, {nh}, {L}, {hd}), k and v ({B}, {nkv}, {L}, {hd}), {str(s.dtype)[6:]}; median of 5 runs. "
            "Why a backend refused a call is listed under the table.")
    s.table("call", "default dispatch ran", "ms", *(b.name for b in BACKENDS))
    found, refusals = {}, {}

    def one(label, f):
        with torch.no_grad() if "backward" not in label else torch.enable_grad():
            ran = kernel_ran(f)
            ms = s.median_ms(f, reps=5, warmup=1)
            cells, refusals[label] = alone(s, f) if label in raw else ([""] * len(BACKENDS), {})
        found[label] = ran
        s.row(label, ran, f"{ms:.2f}", *cells)

    raw = s.part("inputs", lambda: calls(s, B, L, nh, nkv, hd)) or {}
    for label, f in {**raw, **(s.part("model", lambda: model_calls(s, B, L, a.cpu_smoke)) or {})}.items():
        s.part(label, lambda: one(label, f), needs=2)
    s.write("")
    for label, why in refusals.items():
        for backend, reason in why.items():
            s.write(f"- {label}, {backend}: {reason}")
    s.record(kernels=found, refusals=refusals)
    short = {"bidirectional, no mask, grouped K/V (enable_gqa)": "bidirectional",
             "causal, grouped K/V, forward + backward": "causal fwd+bwd",
             "bidirectional, bool key-padding mask, grouped K/V (enable_gqa)": "masked GQA",
             "model.hidden_states, 1 layer, key_padding_mask": "model with padding"}
    s.finish("; ".join(f"{v}: {found[k]}" for k, v in short.items() if k in found) or "no call ran")


if __name__ == "__main__":
    main()
