"""
The GPU figures BENCHMARKS.md lacks, on one NVIDIA GPU, as markdown tables. Not a test: a
measurement. Run by bench/gpu.sh (which adds training throughput); alone:

    python bench/gpu.py                 # CUDA, the paper's shape: batch 8 x 2048, Mistral-7B layer sizes
    python bench/gpu.py --cpu-smoke     # the same code at a tiny size on CPU, to check that it runs

Sections, each timed with torch.cuda.synchronize around it (median of --iters):
1. attention: which scaled_dot_product_attention backend the model's bidirectional attention
   with grouped-query heads runs (the aten op it dispatches to), and each backend forced alone:
   its time, or why it refuses;
2. logits in bf16 vs fp32 on a mid-size model: forward time, max |difference|, top-1 agreement;
3. torch.compile of tess2.predict with fullgraph=True (a graph break is an error): whether it
   compiles, max |compiled - eager|, time of each;
4. sampling at the paper's shape (Mistral-7B layer sizes, random bf16 weights, V 32001): seconds
   per step of sample.diffuse with argmax, with nucleus top-p 0.99 and with reward guidance
   (G = 1, a reward model of --rm-layers layers, halved until it fits), peak memory, and the
   model's FLOPs per second;
5. projection alone: the full-sort nucleus against tess2.project on (n, 32001) bf16 logits.
A section that fails prints its error as a row and the next one runs.
"""
import argparse
import copy
import os
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import sample  # noqa: E402
import tess2  # noqa: E402
from bench_sample import sort_project  # noqa: E402
from model import Transformer, preset  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--cpu-smoke", action="store_true", help="run every section on CPU at a tiny size")
p.add_argument("--batch", type=int, default=8, help="rows B (paper: 8)")
p.add_argument("--length", type=int, default=2048, help="row length L (paper: 2048; the first 64 are context)")
p.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-sized diffusion model")
p.add_argument("--rm-layers", type=int, default=32, help="decoder layers of the reward model (halved on OOM)")
p.add_argument("--steps", type=int, default=3, help="diffusion steps timed per run")
p.add_argument("--iters", type=int, default=5, help="timed repeats of the small sections (median)")
a = p.parse_args()
if a.cpu_smoke:
    dev, dtype = torch.device("cpu"), torch.float32
    a.batch, a.length, a.layers, a.rm_layers, a.steps, a.iters = 1, 64, 1, 1, 1, 1
    big = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    mid, V = big, 512
else:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    big = dict(vocab_size=32001)  # Mistral-7B's layers (preset mistral-7b) with TESS 2's vocabulary
    mid = dict(vocab_size=32001, hidden_size=2048, intermediate_size=7168, num_attention_heads=16,
               num_key_value_heads=4)
    V = 32001
cuda = dev.type == "cuda"


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(f, iters=None, warmup=1):
    """Median seconds of f() over iters runs after warmup runs."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(iters or a.iters):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gb():
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def build(args, dt=dtype):
    """A randomly initialised Transformer, made on the device directly in its dtype."""
    torch.manual_seed(0)
    torch.set_default_dtype(dt)
    try:
        with dev:
            return Transformer(args).init_weights().eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(torch.float32)


def rows(B, L, vocab, context=64):
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(3, vocab, (B, L), generator=g, device=dev)
    span_mask = (torch.arange(L, device=dev) >= min(context, L // 2)).expand(B, L).contiguous()
    return ids, span_mask


def section(title, header):
    def wrap(f):
        print(f"\n### {title}\n\n| {' | '.join(header)} |\n|{' --- |' * len(header)}", flush=True)
        try:
            f()
        except Exception as e:  # one section's failure must not cost the others
            print(f"| error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} |", flush=True)
            traceback.print_exc(file=sys.stderr)
        return f
    return wrap


name = torch.cuda.get_device_name() if cuda else "CPU (smoke run: tiny sizes, not a measurement)"
print(f"## {name}: torch {torch.__version__}, batch {a.batch} x {a.length}, {dtype}".replace("torch.", ""))


@section("Attention: the backend of bidirectional attention with grouped-query heads",
         ["call", "runs", "ms", "notes"])
def attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    args = preset("mistral-7b", **big, num_hidden_layers=1, timestep_embed=True, causal=False)
    model = build(args)
    ids, _ = rows(a.batch, a.length, args.vocab_size)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.hidden_states(ids, causal=False)
        sync()
    ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "flash" in e.key})
    ms = timed(lambda: model.hidden_states(ids, causal=False)) * 1e3
    print(f"| model forward, 1 layer (default dispatch) | yes | {ms:.2f} | ops: {', '.join(ops)} |")
    nh, nkv, hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(a.batch, nh, a.length, hd, generator=g, device=dev, dtype=dtype)
    k, v = (torch.randn(a.batch, nkv, a.length, hd, generator=g, device=dev, dtype=dtype) for _ in range(2))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)  # noqa: E731
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
            warnings.simplefilter("always")
            try:
                ms, ok, why = timed(call) * 1e3, "yes", ""
            except RuntimeError as e:
                ms, ok, why = float("nan"), "no", str(e).splitlines()[0]
        why = "; ".join([why] + [str(w.message).splitlines()[0] for w in caught][:3]).strip("; ")
        print(f"| SDPA forced to {backend.name}, enable_gqa, (B, {nh}/{nkv}, L, {hd}) | {ok} | {ms:.2f} | "
              f"{why.replace('|', '/')[:300]} |", flush=True)


@section("Logits in bf16 vs fp32 (mid-size model)", ["dtype", "forward ms", "max abs diff to fp32",
                                                      "mean abs diff to fp32", "top-1 agreement"])
def logits_dtype():
    args = preset("mistral-7b", **mid, num_hidden_layers=8, timestep_embed=True, causal=False)
    ref = build(args, torch.float32)
    ids, _ = rows(min(a.batch, 2), a.length, args.vocab_size)
    want = ref(ids, causal=False)  # (B, L, V) fp32
    for dt in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(ref).to(dt)
        got = model(ids, causal=False).float()
        ms = timed(lambda: model(ids, causal=False)) * 1e3
        diff = (got - want).abs()
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
        print(f"| {str(dt)[6:]} | {ms:.1f} | {diff.max():.4f} | {diff.mean():.5f} | {agree:.4f} |", flush=True)
        del got, diff


@section("torch.compile of tess2.predict (fullgraph=True: a graph break is an error)",
         ["self-conditioning", "compiles", "max abs diff to eager", "eager ms", "compiled ms"])
def compiled():
    args = preset("mistral-7b", **mid, num_hidden_layers=2, timestep_embed=True, causal=False)
    model = build(args)
    B, L = min(a.batch, 2), min(a.length, 512)
    ids, span_mask = rows(B, L, args.vocab_size)
    g = torch.Generator(device=dev).manual_seed(1)
    S = 5.0 * torch.randn(B, L, args.vocab_size, generator=g, device=dev)
    t = torch.full((B,), 0.5, device=dev)
    prev = torch.randn(B, L, args.vocab_size, generator=g, device=dev)
    fast = torch.compile(tess2.predict, fullgraph=True, backend="inductor" if cuda else "eager")
    for label, previous in (("none (first step)", None), ("previous logits", prev)):
        eager = lambda: tess2.predict(model, ids, span_mask, S, t, previous)  # noqa: E731
        try:
            diff = (fast(model, ids, span_mask, S, t, previous).float() - eager().float()).abs().max()
            ok, c_ms = "yes", timed(lambda: fast(model, ids, span_mask, S, t, previous)) * 1e3
        except Exception as e:
            ok, diff, c_ms = f"no: {type(e).__name__}: {str(e).splitlines()[0][:200]}", float("nan"), float("nan")
        print(f"| {label} | {ok} | {float(diff):.3g} | {timed(eager) * 1e3:.1f} | {c_ms:.1f} |", flush=True)


@section("Sampling at the paper's shape: seconds per step of sample.diffuse",
         ["model", "projection", "guidance", "s/step", "peak GB", "model TFLOP/s"])
def sampling():
    args = preset("tess2-7b", **big, num_hidden_layers=a.layers)
    model = build(args)
    ids, span_mask = rows(a.batch, a.length, args.vocab_size)
    seeds = list(range(a.batch))
    # forward FLOPs per step: 2 per weight per token (embedding lookup aside) + QK^T and AV
    D, T = args.hidden_size, a.batch * a.length
    flops = 2 * (model.num_params() - args.vocab_size * D) * T + 4 * args.num_hidden_layers * T * a.length * D
    label = f"{model.num_params() / 1e9:.2f}B, {a.layers} layers"

    def run(top_p, guide=None, guidance="none"):
        sample.diffuse(model, ids, span_mask, seeds, steps=1, top_p=top_p, guide=guide)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        s = timed(lambda: sample.diffuse(model, ids, span_mask, seeds, steps=a.steps, top_p=top_p, guide=guide),
                  iters=1, warmup=0) / a.steps
        tf = flops / s / 1e12 if guide is None else float("nan")
        print(f"| {label} | {'argmax' if top_p is None else f'top-p {top_p}'} | {guidance} | {s:.3f} | "
              f"{peak_gb():.1f} | {tf:.0f} |", flush=True)

    run(None)
    run(0.99)
    layers = a.rm_layers
    while layers >= 1:
        rm = build(preset("mistral-7b", **big, num_hidden_layers=layers, head="score"))
        rm.requires_grad_(False)  # as sample.run's guidance_mode: frozen weights, blocks recomputed
        rm.gradient_checkpointing = True
        guide = lambda x, r: tess2.reward_guidance(rm, x, ids[r], span_mask[r], eta=0.25, steps=1)  # noqa: E731
        try:
            return run(0.99, guide, f"G = 1, reward model {layers} layers")
        except torch.cuda.OutOfMemoryError:
            print(f"| {label} | top-p 0.99 | reward model {layers} layers: out of memory | | | |", flush=True)
        del rm, guide  # outside the handler, so that the failed run's tensors are freed too
        torch.cuda.empty_cache()
        layers //= 2


@section(f"Projection alone: full-sort nucleus vs tess2.project, top-p 0.99, {str(dtype)[6:]} logits",
         ["logits", "n", "sort ms", "project ms", "sort / project"])
def projection():
    g = torch.Generator(device=dev).manual_seed(0)
    zipf = lambda n: -2.0 * torch.rand(n, V, generator=g, device=dev).argsort(-1).add(1).float().log()  # noqa: E731
    flat = lambda n: torch.randn(n, V, generator=g, device=dev)  # noqa: E731
    for kind, make in (("peaked (Zipf s=2)", zipf), ("flat (N(0, 1))", flat)):
        for n in (a.length, a.batch * a.length):
            logits = make(n).to(dtype)
            old = timed(lambda: sort_project(logits, 0.99, torch.Generator(device=dev).manual_seed(1)))
            new = timed(lambda: tess2.project(logits, 0.99, torch.Generator(device=dev).manual_seed(1)))
            print(f"| {kind} | {n} | {old * 1e3:.2f} | {new * 1e3:.2f} | {old / new:.1f}x |", flush=True)
