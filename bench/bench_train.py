"""
Training throughput of each stage's step (forward, backward, AdamW) as train.py runs it:
train.Objective on a synthetic micro-batch, one process. Not a test: a measurement.

    python bench/bench_train.py                                   # CPU: tiny and small presets
    python bench/bench_train.py --device cuda --preset mistral-layers --batch 2 --seq 2048

On CUDA it uses bf16 autocast and fused AdamW like train.py, and reports model FLOPs
utilisation (support/flops.py / --peak-tflops). "mistral-layers" is Mistral-7B's layer
size (D 4096, 14336 MLP, 32/8 heads, V 32001) with --layers layers, so that one GPU can hold
weights, gradients and AdamW state. Tokens/s per layer does not carry over to the 32-layer model
as it is: the head, the cross-entropy, p @ E and the noise are a fixed cost per token, whatever
the number of layers. Diffusion stages self-condition every other step (the expected rate is one
in two).

For adapt and sft it times, interleaved step by step in one process, the loss as train.py computes
it (support/fused_loss.py: head, cross-entropy and p @ E at span positions, in chunks sized for
the device by fused_loss.chunk_rows) against the plain tess2.diffusion_loss over every position
("plain", what train.py ran before), the span loss in one chunk ("span, 1 chunk": does chunking
cost time?) and, on CPU, the span loss under bf16 autocast. On CPU it reports thread CPU time
(time.thread_time; run with --threads 1), steadier than wall time on a shared machine.

    python bench/bench_train.py --threads 1 --preset tiny small --vocab 32001
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import fused_loss  # noqa: E402
from support.flops import flops_per_token  # noqa: E402
import tess2  # noqa: E402
import train  # noqa: E402
from model import Transformer, preset  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
parser.add_argument("--preset", nargs="+", default=None,
                    help="model presets (model.PRESETS, or mistral-layers); default: tiny small on CPU")
parser.add_argument("--vocab", type=int, default=None, help="vocabulary size V (default: the preset's)")
parser.add_argument("--layers", type=int, default=2, help="decoder layers of the mistral-layers preset")
parser.add_argument("--stages", nargs="+", default=list(train.STAGES), help="stages to time")
parser.add_argument("--batch", type=int, default=4, help="micro-batch size B (pairs for rm)")
parser.add_argument("--seq", type=int, default=256, help="sequence length L")
parser.add_argument("--iters", type=int, default=6, help="timed steps per stage (median reported)")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing, as --grad-ckpt")
parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak for MFU (H100 bf16 dense: 989)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device(args.device)
presets = args.preset or (["tiny", "small"] if args.device == "cpu" else ["mistral-layers"])


def make_model(name, stage):
    over = dict(train.STAGES[stage]["model"])
    if name == "mistral-layers":
        a = preset("mistral-7b", vocab_size=32001, num_hidden_layers=args.layers, **over)
    else:
        a = preset(name, **over, **({"vocab_size": args.vocab} if args.vocab else {}))
    torch.manual_seed(0)
    with torch.device(device):
        net = Transformer(a).init_weights()
    net.gradient_checkpointing = args.grad_ckpt
    return net


def synthetic_batch(stage, V, g):
    """A micro-batch shaped like train.make_batch's: random ids, a UL2 mask (adapt) or a prefix
    mask (sft), per-sequence t and noise seeds; pairs for rm."""
    B, L = args.batch, args.seq
    ids = torch.randint(3, V, (B, L), generator=g)
    ids[:, 0] = 1  # BOS
    if stage == "rm":
        b = dict(chosen=ids, rejected=torch.randint(3, V, (B, L), generator=g),
                 chosen_last=torch.full((B,), L - 1), rejected_last=torch.full((B,), L - 1))
    else:
        b = dict(ids=ids)
        if stage == "adapt":
            b["span_mask"] = torch.stack([tess2.ul2_mask(L, g) for _ in range(B)])
        if stage == "sft":
            b["span_mask"] = tess2.prefix_mask(L, L // 4).expand(B, L)
        if stage in ("adapt", "sft"):
            b["t"] = torch.randint(tess2.NUM_TRAIN_STEPS, (B,), generator=g)
            b["noise_seeds"] = list(range(B))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


class PlainObjective(train.Objective):
    """train.Objective as it was before the span-only loss: tess2.diffusion_loss at every position (its
    mean over the span targets: the same work as a per-sequence weighting of its sums)."""

    def forward(self, b):
        if self.stage not in ("adapt", "sft"):
            return super().forward(b)
        net, ids = self.net, b["ids"]
        eps = tess2.row_noise(b["noise_seeds"], ids.size(1), net.args.vocab_size, ids.device)  # (B, L, V)
        return tess2.diffusion_loss(net, ids, b["span_mask"], t=b["t"], eps=eps, self_condition=b["self_condition"])


class OneChunkObjective(train.Objective):
    """train.Objective with the span-only loss in one chunk: all (N, V) span logits alive at once."""

    def forward(self, b):
        chunk_rows = fused_loss.chunk_rows
        fused_loss.chunk_rows = lambda vocab_size, device: 1 << 30
        try:
            return super().forward(b)
        finally:
            fused_loss.chunk_rows = chunk_rows


def variants(stage):
    """(label, Objective class, bf16 autocast) to time for a stage."""
    bf16 = device.type == "cuda"
    if stage not in ("adapt", "sft"):
        return [("as is", train.Objective, bf16)] + ([("bf16", train.Objective, True)] if not bf16 else [])
    out = [("plain", PlainObjective, bf16), ("span", train.Objective, bf16),
           ("span, 1 chunk", OneChunkObjective, bf16)]
    return out + ([("span + bf16", train.Objective, True)] if not bf16 else [])


@dataclass
class Variant:
    """One way of computing a stage's step, with its own copy of the model, and its timings."""
    label: str
    net: Transformer
    objective: train.Objective
    bf16: bool            # under bf16 autocast
    batch: dict           # the synthetic micro-batch
    count: int            # its target_count: what the loss is divided by
    opt: torch.optim.AdamW
    times: list = field(default_factory=list)


def timed_step(v, i):
    """One step (forward, backward, clipping, AdamW) of variant v; its seconds (CPU: this thread's time).
    Diffusion rows self-condition on odd steps (the coins stay on the host, as in train.py)."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    v.batch["self_condition"] = torch.full((args.batch,), i % 2 == 1)  # (B,) bool
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=v.bf16):
        loss = v.objective(v.batch)
    (loss / v.count).backward()
    torch.nn.utils.clip_grad_norm_(v.objective.parameters(), 1.0)
    v.opt.step()
    v.opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0


def bench(name, stage):
    """Rows of one (preset, stage): each variant's median over --iters steps, taken in turn."""
    vs = []
    weighting = train.STAGES[stage]["loss_weighting"]
    for label, cls, bf16 in variants(stage):
        net = make_model(name, stage)  # the same weights for every variant
        objective = cls(net, stage, weighting)
        b = synthetic_batch(stage, net.args.vocab_size, torch.Generator().manual_seed(0))
        vs.append(Variant(label=label, net=net, objective=objective, bf16=bf16, batch=b,
                          count=train.target_count(stage, b, weighting),
                          opt=torch.optim.AdamW(objective.parameters(), lr=1e-5, fused=device.type == "cuda")))
    for i in range(args.warmup + args.iters):
        for v in vs:  # interleaved: the machine's load falls on every variant alike
            dt = timed_step(v, i)
            if i >= args.warmup:
                v.times.append(dt)
    rows = []
    for v in vs:
        dt = statistics.median(v.times)
        tokens = args.batch * args.seq * (2 if stage == "rm" else 1)
        row = dict(preset=name, stage=stage, variant=v.label, params_m=v.net.num_params() / 1e6,
                   tokens_per_s=tokens / dt, step_ms=dt * 1e3, vs_first=statistics.median(vs[0].times) / dt)
        if device.type == "cuda":
            span = v.batch["span_mask"].float().mean().item() if "span_mask" in v.batch else None
            flops = flops_per_token(v.net.args, v.net.num_params(), args.seq, stage, span_fraction=span)
            row.update(mfu=flops * tokens / dt / (args.peak_tflops * 1e12),
                       mem_gb=torch.cuda.max_memory_allocated() / 2**30)
        rows.append(row)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return rows


print(f"# {device}, threads {torch.get_num_threads()}, batch {args.batch} x seq {args.seq}, "
      f"V {args.vocab or 'preset'}, "
      f"median of {args.iters} steps after {args.warmup} warm-up ({'wall' if device.type == 'cuda' else 'thread CPU'} "
      f"time), torch {torch.__version__}; x: speed relative to the first row of the stage")
for name in presets:
    for stage in args.stages:
        for r in bench(name, stage):
            extra = f"  MFU {r['mfu']:.1%}  mem {r['mem_gb']:.1f} GB" if "mfu" in r else ""
            print(f"{r['preset']:>15} {r['stage']:>6} {r['variant']:>14}  {r['params_m']:8.2f}M params  "
                  f"{r['tokens_per_s']:10.0f} tokens/s  {r['step_ms']:9.1f} ms/step  {r['vs_first']:5.2f}x{extra}",
                  flush=True)
