"""
Full training against LoRA: peak memory and tokens/s of train.py's adapt step (train.Objective:
the span-only diffusion loss, self-conditioning on every row, AdamW over what trains) on CPU, each
configuration in a fresh process so that ru_maxrss is its own peak; then the computed memory of a
7B adaptation (weights, gradients, AdamW state) for full training, LoRA, and FSDP2 over 8 GPUs.
Not a test: a measurement.

    python bench/bench_lora.py                                  # smollm2-135m and qwen2.5-0.5b, r 16
    python bench/bench_lora.py --models smollm2-135m --steps 3 --batch 2 --seq 128

A model is a preset (model.PRESETS, random weights: the same shapes and so the same cost), or a
checkpoint folder; smollm2-135m uses the converted SmolLM2-135M weights if `python -m data.smollm2`
has made them. Memory is the whole process's peak RSS (Python, torch and the model included) and
its growth over the process before training; tokens/s is B x L per step over the timed steps.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GB = 1e9


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def load(name, rank):
    """The adapt stage's model (timestep embedding, bidirectional), with LoRA at rank > 0."""
    import torch
    from model import Transformer, preset
    from support import lora
    smollm2 = os.path.expanduser("~/.cache/tess2/smollm2-135m-instruct")
    path = smollm2 if name == "smollm2-135m" and os.path.isdir(smollm2) else name if os.path.isdir(name) else None
    if path:
        net = Transformer.from_pretrained(path, timestep_embed=True, causal=False, verbose=False)
    else:
        torch.manual_seed(0)
        net = Transformer(preset(name, timestep_embed=True, causal=False)).init_weights()
    if rank:  # all seven block Linears, and the last id as [PAD]
        lora.apply_lora(net, path or name, rank, 2.0 * rank, token_rows=lora.pad_rows(net, net.args.vocab_size - 1))
    return net, path or f"preset {name} (random weights)"


def child(a):
    """One configuration in this fresh process: warm-up step, timed steps, peak RSS -> one JSON line."""
    import torch
    import tess2
    import train
    torch.set_num_threads(a.threads)
    before = rss()
    net, source = load(a.model, a.rank)
    built = rss()
    objective = train.Objective(net, "adapt", "sequence")
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    V, B, L = net.args.vocab_size, a.batch, a.seq
    batch = dict(ids=torch.randint(3, V - 1, (B, L), generator=g),
                 span_mask=torch.stack([tess2.ul2_mask(L, g) for _ in range(B)]),
                 t=torch.randint(0, tess2.NUM_TRAIN_STEPS, (B,), generator=g), noise_seeds=list(range(B)),
                 self_condition=torch.ones(B, dtype=torch.bool))  # the costlier half: an extra pass
    times = []
    for _ in range(1 + a.steps):
        t0 = time.perf_counter()
        (objective(batch) / B).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(model=a.model, source=source, rank=a.rank, params=net.num_params(),
                          trained=sum(p.numel() for p in params), tokens_per_s=B * L * a.steps / sum(times[1:]),
                          peak_gb=rss() / GB, model_gb=(built - before) / GB, training_gb=(rss() - built) / GB)))


def measured(a):
    rows = []
    for model in a.models:
        for rank in (0, a.rank):
            cmd = [sys.executable, __file__, "--child", "--model", model, "--rank", str(rank), "--steps", str(a.steps),
                   "--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"## measured: adapt step, fp32, B {a.batch} x L {a.seq}, {a.steps} timed steps after one, "
          f"{a.threads} thread(s), LoRA r {a.rank} alpha {2 * a.rank} on all seven block Linears")
    print("| model | training | trained parameters | tokens/s | peak RSS (GB) | model (GB) | training's growth (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        kind = f"LoRA r {r['rank']}" if r["rank"] else "full"
        print(f"| {r['model']} | {kind} | {r['trained'] / 1e6:.2f}M of {r['params'] / 1e6:.2f}M "
              f"| {r['tokens_per_s']:.0f} "
              f"| {r['peak_gb']:.2f} | {r['model_gb']:.2f} | {r['training_gb']:.2f} |")
    print("\nsources: " + "; ".join(sorted({f"{r['model']}: {r['source']}" for r in rows})))


def computed(rank, gpus=8):
    """Bytes of weights, gradients and AdamW state (no activations) of Mistral-7B's adaptation, counted
    on the model built on the meta device (no memory), with LoRA applied as train.py applies it."""
    import torch
    from model import Transformer, preset
    from support import lora
    with torch.device("meta"):
        net = Transformer(preset("tess2-7b"))
    n = net.num_params()
    lora.apply_lora(net, "mistralai/Mistral-7B-v0.1", rank, 2.0 * rank, token_rows=lora.pad_rows(net, 32000))
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)  # adapters, [PAD] rows, timestep
    held = net.num_params()  # the frozen base, the adapters and the trained rows
    fp32, adamw = 4, 8  # bytes per parameter: an fp32 value; AdamW's two fp32 moments
    rows = [("full, one GPU", n * fp32, n * fp32, n * adamw),
            (f"LoRA r {rank}, one GPU (frozen base in fp32, as train.py keeps it)", held * fp32,
             trained * fp32, trained * adamw),
            (f"LoRA r {rank}, one GPU, if the frozen base were kept in bf16", (held - trained) * 2 + trained * fp32,
             trained * fp32, trained * adamw),
            (f"full, FSDP2 over {gpus} GPUs, per GPU", n * fp32 / gpus, n * fp32 / gpus, n * adamw / gpus),
            (f"LoRA r {rank}, FSDP2 over {gpus} GPUs, per GPU", held * fp32 / gpus, trained * fp32 / gpus,
             trained * adamw / gpus)]
    print(f"\n## computed: Mistral-7B adapted (tess2-7b, {n / 1e9:.3f}B parameters; LoRA r {rank} on all seven "
          f"block Linears + [PAD] rows + timestep embedding: {trained / 1e6:.1f}M trained), before activations")
    print("| training | weights (GB) | gradients (GB) | AdamW (GB) | total (GB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, w, g, o in rows:
        print(f"| {name} | {w / GB:.1f} | {g / GB:.2f} | {o / GB:.2f} | {(w + g + o) / GB:.1f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"],
                   help="presets or checkpoint folders")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha 2 r)")
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    p.add_argument("--batch", type=int, default=2, help="B")
    p.add_argument("--seq", type=int, default=128, help="L")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--computed-only", action="store_true", help="only the 7B figures")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
    else:
        if not a.computed_only:
            measured(a)
        computed(a.rank)
