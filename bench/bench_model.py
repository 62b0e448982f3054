"""
Forward + backward time of model.Transformer against transformers' MistralForCausalLM at the
same config, same weights, same inputs, on this machine (fp32). Not a test: a measurement.

    python bench/bench_model.py                      # hidden 512, 4 layers, seq 512, batch 2
    python bench/bench_model.py --layers 8 --compile # also time our torch.compile'd model

transformers is a dev-only dependency, imported here and in tests only.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer  # noqa: E402

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
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

from transformers import MistralConfig, MistralForCausalLM  # noqa: E402  (dev-only)

margs = ModelArgs(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  sliding_window=None, max_position_embeddings=max(2048, args.seq))
torch.manual_seed(0)
ours = Transformer(margs).init_weights()
hf_cfg = {k: v for k, v in margs.to_hf().items() if k not in ("architectures", "causal", "timestep_embed")}
hf = MistralForCausalLM(MistralConfig(**hf_cfg, attn_implementation="sdpa"))
hf.load_state_dict(ours.state_dict())  # the same weights, by the same names
ours.train(), hf.train()  # dropout is 0 in both; train mode as in a training step
ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
causal = not args.bidirectional

with torch.no_grad():  # same function, or the timing means nothing
    diff = (ours(ids, causal=True) - hf(ids).logits).abs().max().item()
assert diff < 1e-3, f"our logits differ from transformers' by {diff}"


def step_ours(m):
    return lambda: F.cross_entropy(m(ids, causal=causal).flatten(0, 1), ids.flatten())


def step_hf():
    return F.cross_entropy(hf(ids).logits.flatten(0, 1), ids.flatten())


def timed(step, model):
    """(wall, cpu) seconds of one forward + backward. CPU time (all threads of this process) is
    the steadier number on a shared machine: other processes stretch wall time, not our work."""
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    step().backward()
    return time.perf_counter() - t0, time.process_time() - c0


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
