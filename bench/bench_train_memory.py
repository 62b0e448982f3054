"""
Training memory of one diffusion step: the bytes autograd keeps for backward (saved tensors, each
storage counted once), with and without self-conditioning, and the peak RSS growth of the step.
At V = 32001 the (B, L, V) tensors dominate, so the result is also given in units of one fp32
(B, L, V) tensor. Not a test: a measurement.

    python bench/bench_train_memory.py                        # this checkout's tess2.py
    python bench/bench_train_memory.py --loss span            # what train.py runs: support/fused_loss.py

Prefix MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns every freed block of over 64 KiB at once:
the peak RSS then follows the live tensors rather than the allocator's reuse of freed memory.
    git show 068256b:tess2.py > /tmp/tess2_068256b.py         # before the span path read E detached
    python bench/bench_train_memory.py --tess2 /tmp/tess2_068256b.py
"""
import argparse
import importlib.util
import os
import resource
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import fused_loss  # noqa: E402
from model import Transformer, preset  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tess2", default=os.path.join(ROOT, "tess2.py"), help="the tess2.py to measure")
parser.add_argument("--loss", choices=("plain", "span"), default="plain",
                    help="plain: tess2.diffusion_loss; span: fused_loss.diffusion_loss (train.py's)")
parser.add_argument("--span", type=float, default=0.75, help="share of each row that is span (after a context prefix)")
parser.add_argument("--preset", default="tiny", help="model preset (model.PRESETS)")
parser.add_argument("--vocab", type=int, default=32001, help="vocabulary size V")
parser.add_argument("--batch", type=int, default=2, help="B")
parser.add_argument("--seq", type=int, default=256, help="L")
args = parser.parse_args()
torch.set_num_threads(1)

spec = importlib.util.spec_from_file_location("tess2_measured", args.tess2)
tess2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tess2)


def saved_bytes(net, batch, self_condition):
    """Bytes of the distinct storages autograd saves during the loss's forward, then runs backward."""
    storages = {}

    def pack(x):
        s = x.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        if args.loss == "span":
            ids, span, t = batch
            loss = fused_loss.diffusion_loss(net, ids, span, t, list(range(len(ids))), self_condition,
                                             torch.ones(len(ids)))
            count = span[:, 1:].sum()
        else:
            loss, count = tess2.diffusion_loss(net, *batch, eps=torch.randn(B, L, V), self_condition=self_condition), 1
    (loss / count).backward()
    net.zero_grad(set_to_none=True)
    return sum(storages.values())


torch.manual_seed(0)
net = Transformer(preset(args.preset, vocab_size=args.vocab, timestep_embed=True, causal=False)).init_weights()
B, L, V = args.batch, args.seq, args.vocab
ids = torch.randint(3, V, (B, L))
span = torch.ones(B, L, dtype=torch.bool)
span[:, : L - round(args.span * L)] = False  # a prefix-LM row: context, then span
batch = (ids, span, torch.randint(0, tess2.NUM_TRAIN_STEPS, (B,)))  # the noise is drawn inside the step, as in train.py
unit = B * L * V * 4  # one fp32 (B, L, V) tensor
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rows = [(sc, saved_bytes(net, batch, sc)) for sc in (False, True)]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
print(f"# {args.loss} loss ({args.tess2 if args.loss == 'plain' else 'support/fused_loss.py'}), span {args.span:.0%}: "
      f"preset {args.preset}, B {B} x L {L} x V {V} "
      f"(one fp32 (B, L, V) tensor = {unit / 2**20:.1f} MiB), torch {torch.__version__}")
for sc, n in rows:
    print(f"self_condition={sc!s:5}  saved for backward {n / 2**20:8.1f} MiB = {n / unit:.2f} (B, L, V)")
print(f"peak RSS growth over both steps {rss / 2**20:.1f} MiB = {rss / unit:.2f} (B, L, V)")
