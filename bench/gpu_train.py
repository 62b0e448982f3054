"""
(e) Training MFU at L = 2048: train.py's adapt step as it runs it (train.Objective, whose loss is
support/fused_loss.py; bf16 autocast, fp32 weights, fused AdamW, gradient clipping) on Mistral-7B-sized
layers with V = 32001 and random weights, at two layer counts, with self-conditioning pinned on and
off. Each row: the median of 5 steps after 2, each step between CUDA events; FLOPs from
support/flops.py with the batch's real span share (UL2 masks); MFU against 989 TFLOP/s (the bf16
dense datasheet rate of an H100 and H200) and against the bf16 matrix-product rate section (a)
measured. The two layer counts split a step's time into a part per layer and a fixed part per token
(the head, the cross-entropy, p @ E, the noise), whose share is then extrapolated to 32 layers:
tokens/s does not scale with 1 / layers.
"""
import statistics

import torch

import gpu_common
import tess2
import train
from model import preset
from support import flops

WARM, TIMED = 2, 5


def batch(s, B, L, V):
    """A micro-batch as train.make_batch makes one for adapt: random tokens after BOS, a UL2 mask per row,
    t and noise seeds per row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (B, L), generator=g)
    ids[:, 0] = 1
    b = dict(ids=ids, span_mask=torch.stack([tess2.ul2_mask(L, g) for _ in range(B)]),
             t=torch.randint(tess2.NUM_TRAIN_STEPS, (B,), generator=g), noise_seeds=list(range(B)))
    return {k: v.to(s.dev) if torch.is_tensor(v) else v for k, v in b.items()}


def step_ms(s, objective, opt, b, self_condition):
    """Median ms of WARM + TIMED training steps (after WARM), self-conditioning pinned."""
    weighting = train.STAGES["adapt"]["loss_weighting"]
    count = train.target_count("adapt", b, weighting)
    b = {**b, "self_condition": torch.full((len(b["ids"]),), bool(self_condition))}  # (B,) the coin, pinned
    times = []
    for i in range(WARM + TIMED):
        start = s.mark()
        with torch.autocast(s.dev.type, dtype=torch.bfloat16, enabled=s.cuda):
            loss = objective(b)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append((start, s.mark()))
    return statistics.median(s.ms(a, e) for a, e in times[WARM:])


def measure(s, layers, shape, rows):
    """Both self-conditioning settings at `layers` layers: a table row each, and their mean."""
    B, L, V = shape
    args = preset("tiny", **train.STAGES["adapt"]["model"], num_hidden_layers=layers) if not s.cuda else preset(
        "mistral-7b", vocab_size=V, num_hidden_layers=layers, **train.STAGES["adapt"]["model"])
    net = s.random_model(args, dtype=torch.float32, train=True)
    objective = train.Objective(net, "adapt", train.STAGES["adapt"]["loss_weighting"])
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-5, fused=s.cuda)
    b = batch(s, B, L, V)
    share = b["span_mask"].float().mean().item()
    ceiling = s.ceiling_tflops()
    s.reset_peak()
    for sc in (1.0, 0.0):
        ms = step_ms(s, objective, opt, b, bool(sc))
        per_token = flops.flops_per_token(args, net.num_params(), L, "adapt", span_fraction=share, self_condition=sc)
        rows[(layers, sc)] = dict(ms=ms, flops=per_token * B * L, share=share)
    rows[(layers, 0.5)] = dict(ms=(rows[(layers, 1.0)]["ms"] + rows[(layers, 0.0)]["ms"]) / 2,
                               flops=(rows[(layers, 1.0)]["flops"] + rows[(layers, 0.0)]["flops"]) / 2, share=share)
    for sc in (1.0, 0.0, 0.5):
        r = rows[(layers, sc)]
        tflops = r["flops"] / r["ms"] / 1e9
        label = {1.0: "on", 0.0: "off", 0.5: "0.5 (mean of on and off)"}[sc]
        s.row(layers, f"{net.num_params():.3g}", label, f"{share:.3f}", f"{r['ms']:.1f}",
              f"{B * L / r['ms'] * 1e3:.0f}", f"{tflops:.3g}", f"{tflops / gpu_common.H100_BF16_TFLOPS:.1%}",
              f"{tflops / ceiling:.1%}" if ceiling else "", f"{s.peak_gb():.1f}" if s.cuda else "")
    s.record(e_rows={f"{k[0]} layers, self-conditioning {k[1]}": v for k, v in rows.items()})


def fixed_share(s, rows, few, many):
    """A step's time as fixed + layers x per-layer (self-conditioning 0.5), from two layer counts."""
    t_few, t_many = rows[(few, 0.5)]["ms"], rows[(many, 0.5)]["ms"]
    per_layer = (t_many - t_few) / (many - few)
    fixed = t_few - few * per_layer
    at32 = fixed / (fixed + 32 * per_layer)
    s.write(f"\nTime per step, self-conditioning 0.5: {fixed:.1f} ms fixed + {per_layer:.1f} ms per layer. The fixed "
            f"part is {fixed / t_few:.1%} of a {few}-layer step and {fixed / t_many:.1%} of a {many}-layer one; "
            f"extrapolated, {at32:.1%} of a 32-layer step.")
    s.record(fixed_ms=fixed, per_layer_ms=per_layer, fixed_share_32=at32)
    return fixed / t_few, at32


def main():
    p = gpu_common.parser(__doc__)
    p.add_argument("--layers", type=int, nargs=2, default=[4, 8], help="the two layer counts")
    p.add_argument("--batch", type=int, default=4, help="rows of 2048 per step")
    a = p.parse_args()
    s = gpu_common.Section(a, "e-train", "(e) Training MFU at L = 2048 (adapt step)")
    shape, (few, many) = ((2, 64, 512), (1, 2)) if a.cpu_smoke else ((a.batch, 2048, 32001), a.layers)
    s.write(f"\nBatch {shape[0]} x {shape[1]}, V {shape[2]}, median of {TIMED} steps after {WARM}; "
            f"MFU against {gpu_common.H100_BF16_TFLOPS:.0f} TFLOP/s and against section (a)'s measured rate.")
    s.table("layers", "parameters", "self-conditioning", "span share", "ms/step", "tokens/s", "TFLOP/s",
            "MFU (989)", "MFU (measured ceiling)", "peak GB")
    rows = {}
    s.part(f"{few} layers", lambda: measure(s, few, shape, rows))
    few_ms = rows.get((few, 0.5), {}).get("ms", 0.0)  # its steps at `many` layers take about many / few times longer
    s.part(f"{many} layers", lambda: measure(s, many, shape, rows),
           needs=2 * (WARM + TIMED) * few_ms * many / few / 1e3)
    shares = s.part("fixed share", lambda: fixed_share(s, rows, few, many)) if len(rows) == 6 else None
    layers = many if (many, 0.5) in rows else few
    r = rows.get((layers, 0.5))
    head = "no step measured" if r is None else (
        f"MFU {r['flops'] / r['ms'] / 1e9 / gpu_common.H100_BF16_TFLOPS:.1%} of 989 at {layers} layers, "
        "self-conditioning 0.5")
    if shares:
        head += f"; fixed per-token time {shares[0]:.0%} of a {few}-layer step, ~{shares[1]:.0%} at 32"
    s.finish(head)


if __name__ == "__main__":
    main()
