"""
Forward + backward time of model.Transformer against transformers' MistralForCausalLM at the
same config, same weights, same inputs, on this machine (fp32). Not a test: a measurement.
--sdpa instead prints which SDPA kernel each kind of attention call of the model gets.

    python bench/bench_model.py                      # hidden 512, 4 layers, seq 512, batch 2
    python bench/bench_model.py --layers 8 --compile # also time our torch.compile'd model
    python bench/bench_model.py --sdpa --device cuda --dtype bfloat16 --seq 2048

transformers is a dev-only dependency, imported here and in tests only.
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer, attend, attention_mask  # noqa: E402

# (name, causal, rows of two lengths, a sliding window of T / 4): each kind of call hidden_states makes
CALLS = (("bidirectional", False, False, False), ("causal", True, False, False), ("masked", False, True, False),
         ("causal, masked", True, True, False), ("causal, windowed", True, False, True))


def sdpa_backends(device="cpu", dtype=torch.float32, T: int = 256) -> dict:
    """
    Which SDPA kernel each kind of attention call of the model gets, made as model.attend makes it
    (forward and backward, 8 query heads of 64, K/V of 8 heads and of 2): {"masked, GQA 4:1":
    ("EFFICIENT_ATTENTION", ["EFFICIENT_ATTENTION", "MATH"]), ...}, the kernel SDPA picks (the first
    of its priority order that accepts the call) and every kernel that accepts it, each tried alone.
    A call that only MATH accepts materialises (B, nh, T, T) scores: slow at long T.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = getattr(torch._C, "_get_sdp_priority_order", lambda: [1, 2, 0, 3])()  # flash, efficient, math, cudnn
    order = [SDPBackend(i) for i in order if SDPBackend(i) != SDPBackend.OVERRIDEABLE]
    nh, hd, report = 8, 64, {}
    real = torch.arange(T, device=device) < torch.tensor([[T], [T // 2]], device=device)  # (2, T)
    for nkv in (nh, nh // 4):
        for kind, causal, padded, windowed in CALLS:
            mask = attention_mask(T, causal, T // 4 if windowed else None, real if padded else None, device)
            q, k, v = (torch.randn(2, n, T, hd, device=device, dtype=dtype, requires_grad=True) for n in (nh, nkv, nkv))
            accepted = []
            for backend in order:
                try:
                    with warnings.catch_warnings(), sdpa_kernel([backend]):
                        warnings.simplefilter("ignore")  # each refusal warns why; the report says which
                        attend(q, k, v, mask, causal and mask is None).sum().backward()
                    accepted.append(backend.name)
                except RuntimeError:  # "No available kernel"
                    pass
            report[f"{kind}, " + ("MHA" if nkv == nh else f"GQA {nh // nkv}:1")] = (accepted[:1] or [None])[0], accepted
    return report


def print_sdpa(args):
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"SDPA kernels of model.attend on {args.device} ({name}), {args.dtype}, T = {args.seq}, "
          f"torch {torch.__version__}")
    print("| call | kernel SDPA picks | kernels that accept it |\n| --- | --- | --- |")
    for kind, (picked, accepted) in sdpa_backends(args.device, dtype, args.seq).items():
        print(f"| {kind} | {picked} | {', '.join(accepted)} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size D")
    parser.add_argument("--layers", type=int, default=4, help="number of decoder layers")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA when fewer than --heads)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    parser.add_argument("--seq", type=int, default=512, help="sequence length T")
    parser.add_argument("--batch", type=int, default=2, help="batch size B")
    parser.add_argument("--iters", type=int, default=7, help="timed iterations per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per model first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    parser.add_argument("--bidirectional", action="store_true",
                        help="time ours without the causal mask (the diffusion setting; transformers stays causal)")
    parser.add_argument("--sdpa", action="store_true", help="print the SDPA kernel of each kind of attention call")
    parser.add_argument("--device", default="cpu", help="--sdpa: cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="--sdpa: dtype")
    return parser.parse_args(argv)


def timed(step, model):
    """(wall, cpu) seconds of one forward + backward. CPU time (all threads of this process) is
    the steadier number on a shared machine: other processes stretch wall time, not our work."""
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    step().backward()
    return time.perf_counter() - t0, time.process_time() - c0


def build(args):
    """(ours, transformers' MistralForCausalLM) with the same weights, and their max |logit diff|."""
    from transformers import MistralConfig, MistralForCausalLM  # dev-only
    margs = ModelArgs(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      sliding_window=None, max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    ours = Transformer(margs).init_weights()
    hf_cfg = {k: v for k, v in margs.to_hf().items() if k not in ("architectures", "causal", "timestep_embed")}
    hf = MistralForCausalLM(MistralConfig(**hf_cfg, attn_implementation="sdpa"))
    hf.load_state_dict(ours.state_dict())  # the same weights, by the same names
    ours.train(), hf.train()  # dropout is 0 in both; train mode as in a training step
    return ours, hf


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sdpa:
        return print_sdpa(args)
    ours, hf = build(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    causal = not args.bidirectional
    with torch.no_grad():  # same function, or the timing means nothing
        diff = (ours(ids, causal=True) - hf(ids).logits).abs().max().item()
    assert diff < 1e-3, f"our logits differ from transformers' by {diff}"
    step_ours = lambda m: lambda: F.cross_entropy(m(ids, causal=causal).flatten(0, 1), ids.flatten())  # noqa: E731
    step_hf = lambda: F.cross_entropy(hf(ids).logits.flatten(0, 1), ids.flatten())  # noqa: E731
    runs = {"ours": (step_ours(ours), ours), "transformers": (step_hf, hf)}
    if args.compile:
        t0 = time.perf_counter()
        compiled = torch.compile(ours)
        timed(step_ours(compiled), ours)
        print(f"compile (first call): {time.perf_counter() - t0:.1f} s")
        runs["ours, compiled"] = (step_ours(compiled), ours)
    for name, (step, model) in runs.items():
        for _ in range(args.warmup):
            timed(step, model)
    times = {name: [] for name in runs}
    for _ in range(args.iters):  # interleaved, so that drift in machine load hits all alike
        for name, (step, model) in runs.items():
            times[name].append(timed(step, model))
    report(args, ours, diff, times)


def report(args, ours, diff, times):
    n = sum(p.numel() for p in ours.parameters())
    print(f"config: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads} kv, vocab {args.vocab}, "
          f"seq {args.seq}, batch {args.batch}, fp32, {n / 1e6:.1f}M params, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {'bidirectional' if args.bidirectional else 'causal'}; "
          f"max |logit diff| {diff:.1e}")
    base = {i: statistics.median(t[i] for t in times["transformers"]) for i in (0, 1)}
    for name, ts in times.items():
        wall, cpu = (statistics.median(t[i] for t in ts) for i in (0, 1))
        print(f"{name:>16}: wall median {wall * 1000:7.1f} ms (min {min(t[0] for t in ts) * 1000:.1f}), "
              f"cpu median {cpu * 1000:7.1f} ms, n={len(ts)};  transformers/this: wall {base[0] / wall:.2f}x, "
              f"cpu {base[1] / cpu:.2f}x")
    print(f"load average over the last minute: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
