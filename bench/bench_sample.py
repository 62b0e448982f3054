"""
Sampling cost: seconds per diffusion step and peak memory of sample.diffuse against the released
pipeline's loop (SimplexDDPMPipeline + DiffusionModelMixin.forward of hamishivi/tess-2, written
out below op for op on our network). Not a test: a measurement.

    python bench/bench_sample.py                    # CPU: tiny layers at V = 512 and 32001, B=2, L=512, 10 steps
    python bench/bench_sample.py --vocab 32001 --batch 1 --length 2048
    python bench/bench_sample.py --device cuda --preset mistral-7b --vocab 32001 --batch 8 --length 2048 --steps 100
    python bench/bench_sample.py --project --threads 1     # the projection alone: tess2.project vs project_fast
    python bench/bench_sample.py --interleaved --before 30afad5 --threads 1   # released vs before vs now, one process

--project times the projection alone (Eq. 5, nucleus top-p 0.99) on (n, V) logits: the full-sort
definition tess2.project against its exact twin support/fused_sampling.project_fast (which
sample.py uses), the two interleaved in one process, thread CPU time, median of repeats, on peaked,
Zipf and flat logits at V = 32001 and on logits the shipped model produces while sampling (V = 4096).

--interleaved times, in one process on one model, the released loop, sample.diffuse as it was at
the git commit --before (its sample.py and tess2.py loaded from git) and sample.diffuse now, in turn,
--repeats times: thread CPU seconds per step, medians, and each one's ratio to the released loop.
With --shipped the model is models/tess2-shakespeare (V = 4096) on one of its prompts' rows.

Otherwise each (implementation, vocabulary) runs in a fresh subprocess. CPU peak memory is the process's
peak resident set (VmHWM) above its resident set just before sampling (tracemalloc does not see
torch's allocations); on CUDA it is torch.cuda.max_memory_allocated above the memory in use before
sampling. Both are also given in units of one (B, L, V) fp32 tensor. The first run of each
measures memory (and pays for first-touch page faults); the time is from a second run, as wall
seconds per step and, on CPU, process CPU seconds per step (steadier on a shared machine).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
import tess2  # noqa: E402
from model import Transformer, preset  # noqa: E402
from support import fused_sampling  # noqa: E402


@torch.inference_mode()
def released_loop(model, ids, span_mask, steps, top_p, generator, k=tess2.SIMPLEX_VALUE):
    """The released sampling loop, as its code does it: a simplex and a zero previous prediction
    materialised up front; each step softmaxes both, mixes, embeds, runs the model, computes the
    (logged) loss, shifts the logits with a concatenation, projects by top-p with a full sort and
    a scatter, turns the tokens into a one-hot simplex, draws new noise and mixes the two."""
    B, L = ids.shape
    V, dev = model.args.vocab_size, ids.device
    E = model.embed_tokens.weight  # (V, D)
    alpha_bars = tess2.alpha_bars(steps).tolist()
    simplex = k * torch.randn(B, L, V, generator=generator, device=dev)
    previous_pred = torch.zeros(B, L, V, device=dev)
    for i in range(steps - 1, -1, -1):
        # DiffusionModelMixin.forward
        inputs_probs = F.softmax(simplex, dim=-1)
        previous_pred_probs = F.softmax(previous_pred, dim=-1)
        mixed_probs = (inputs_probs + previous_pred_probs) / 2
        inputs_embeds = F.linear(mixed_probs.to(E.dtype), E.T)
        t = torch.where(span_mask, i / steps, 0.0)  # (B, L)
        inputs_embeds = inputs_embeds + model.timestep_embed(t.unsqueeze(-1).to(E.dtype))
        inputs_embeds = torch.where(span_mask.unsqueeze(-1), inputs_embeds, model.embed_tokens(ids))
        hidden = model.hidden_states(embeds=inputs_embeds, causal=False)
        prediction_scores = model.lm_head(hidden)
        labels = torch.where(span_mask, ids, -100)[:, 1:]
        loss = F.cross_entropy(prediction_scores[:, :-1].reshape(-1, V).float(), labels.reshape(-1), reduction="none")
        logits = torch.cat([torch.zeros_like(prediction_scores[:, :1]), prediction_scores[:, :-1]], dim=1)
        del inputs_probs, previous_pred_probs, mixed_probs, prediction_scores, loss
        # SimplexDDPMPipeline: self-conditioning input, projection (sample_logits), scheduler step
        previous_pred = logits
        probs = F.softmax(logits, dim=-1)
        sorted_probs, sorted_indices = torch.sort(probs, dim=-1, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) < top_p
        keep[..., 1:] = keep[..., :-1].clone()
        keep[..., 0] = 1
        keep = keep.scatter(dim=2, index=sorted_indices, src=keep)
        filtered = logits.masked_fill(keep == 0, -float("inf"))
        del probs, sorted_probs, sorted_indices, keep
        token_ids = torch.distributions.Categorical(logits=filtered).sample()
        projected = 2 * k * F.one_hot(token_ids, V) - k  # convert_to_simplex
        noise = k * torch.randn(B, L, V, generator=generator, device=dev)
        a = alpha_bars[i - 1] if i > 0 else 1.0
        simplex = math.sqrt(a) * projected + math.sqrt(1 - a) * noise
        del filtered, projected, noise
    return torch.where(span_mask, token_ids, ids)


sort_project = tess2.project  # nucleus sampling by a full sort of V: the definition (bench/gpu.py times it too)


def shipped_logits(n):
    """(n, 4096) span logits of models/tess2-shakespeare, from every step of a 20-step sampling run
    (early steps are flat, late ones peaked), shuffled."""
    from support import prompts
    from support.tokenizer import Tokenizer
    path = os.path.join(ROOT, "models", "tess2-shakespeare")
    model, tok = Transformer.from_pretrained(path, dtype=torch.float32, verbose=False).eval(), Tokenizer(path)
    b = prompts.make_batch(tok, ["Continue this speech by Brutus from Julius Caesar:\nRomans, countrymen, and lovers! "
                              "hear me for my cause,"], prompts.Settings(length=n // 20 + 1), 1024, tok.pad_id)
    ids, span_mask, seen = b.ids, b.span_mask, []
    sample.diffuse(model, ids, span_mask, [0], steps=20, on_step=lambda state: seen.append(state.logits[state.span_mask]))
    seen = torch.cat(seen)  # (20 * span, V)
    return seen[torch.randperm(len(seen), generator=torch.Generator().manual_seed(0))[:n]]


def bench_project(a):
    """The definition (tess2.project, a full sort) vs its twin (project_fast), interleaved, median thread
    CPU time per call."""
    g = torch.Generator().manual_seed(0)
    V = 32001
    # -s log(rank), each row's ranks in a random order of the tokens
    log_rank = torch.arange(1, V + 1).float().log()
    zipf = lambda s, n: -s * log_rank[torch.rand(n, V, generator=g).argsort(-1)]  # noqa: E731
    kinds = {"peaked (Zipf s=2)": lambda n: zipf(2.0, n), "Zipf s=1.5": lambda n: zipf(1.5, n),
             "flat (N(0, 1))": lambda n: torch.randn(n, V, generator=g), "shipped model (V=4096)": shipped_logits}
    print("| logits | n | kept (median) | sort ms | fast ms | sort / fast |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, make in kinds.items():
        for n in a.positions:
            logits = make(n)
            probs = torch.softmax(logits, -1).sort(-1, descending=True).values
            kept = int((probs.cumsum(-1) - probs <= 0.99).sum(-1).median())
            times = {"sort": [], "fast": []}
            for _ in range(a.repeats):
                for impl, f in (("sort", tess2.project), ("fast", fused_sampling.project_fast)):
                    t0 = time.thread_time()
                    f(logits, 0.99, torch.Generator().manual_seed(1))
                    times[impl].append(time.thread_time() - t0)
            sort, fast = (sorted(times[i])[len(times[i]) // 2] * 1e3 for i in ("sort", "fast"))
            print(f"| {name} | {n} | {kept} | {sort:.1f} | {fast:.1f} | {sort / fast:.1f}x |", flush=True)


def load_before(commit):
    """sample.py and tess2.py as they were at `commit`, as modules (that sample bound to that tess2)."""
    import importlib.util
    import tempfile
    folder = tempfile.mkdtemp()
    mods = {}
    for name in ("tess2", "sample"):
        path = os.path.join(folder, f"{name}_before.py")
        with open(path, "w") as f:
            f.write(subprocess.run(["git", "show", f"{commit}:{name}.py"], cwd=ROOT, check=True, capture_output=True,
                                   text=True).stdout)
        spec = importlib.util.spec_from_file_location(f"{name}_before", path)
        mods[name] = importlib.util.module_from_spec(spec)
        real = sys.modules["tess2"]
        sys.modules["tess2"] = mods.get("tess2", real)  # the old sample imports the old tess2
        try:
            spec.loader.exec_module(mods[name])
        finally:
            sys.modules["tess2"] = real
    return mods["sample"]


def bench_interleaved(a):
    """Released loop, diffuse at --before, diffuse now: one process, one model, interleaved."""
    dev = torch.device(a.device)
    torch.manual_seed(0)
    if a.shipped:
        from support import prompts
        from support.tokenizer import Tokenizer
        path = os.path.join(ROOT, "models", "tess2-shakespeare")
        model, tok = Transformer.from_pretrained(path, dtype=torch.float32, verbose=False).eval(), Tokenizer(path)
        b = prompts.make_batch(tok, ["Continue this speech by Brutus from Julius Caesar:\nRomans, countrymen, and lovers! "
                                  "hear me for my cause,"] * a.batch, prompts.Settings(total_length=160), 1024, tok.pad_id)
        ids, span_mask = b.ids.to(dev), b.span_mask.to(dev)
        what = f"shipped model (V = {model.args.vocab_size}), B = {a.batch}, L = {ids.shape[1]}"
    else:
        V = a.vocab[0]
        with dev:
            model = Transformer(preset(a.preset, vocab_size=V, timestep_embed=True, causal=False)).init_weights().eval()
        L, prompt = a.length, min(32, a.length // 2)
        ids = torch.randint(V, (a.batch, L), generator=torch.Generator().manual_seed(0)).to(dev)
        span_mask = (torch.arange(L, device=dev) >= prompt).expand(a.batch, L).contiguous()
        what = f"{a.preset}, V = {V}, B = {a.batch}, L = {L} ({prompt} context)"
    model.requires_grad_(False)
    old = load_before(a.before)
    seeds = list(range(len(ids)))
    impls = {"released loop": lambda: released_loop(model, ids, span_mask, a.steps, 0.99,
                                                    torch.Generator(device=dev).manual_seed(0)),
             f"diffuse at {a.before}": lambda: old.diffuse(model, ids, span_mask, seeds, a.steps, 0.99),
             "diffuse now": lambda: sample.diffuse(model, ids, span_mask, seeds, a.steps, 0.99)}
    times = {k: [] for k in impls}
    for _ in range(a.repeats):
        for k, f in impls.items():
            t0 = time.thread_time()
            f()
            times[k].append((time.thread_time() - t0) / a.steps)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"{what}, {a.steps} steps, top-p 0.99, {torch.get_num_threads()} thread(s), median of {a.repeats}")
    print("| implementation | CPU s/step (median) | all runs | released / this |")
    print("| --- | --- | --- | --- |")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {', '.join(f'{x:.3f}' for x in v)} | {med['released loop'] / med[k]:.2f}x |")


def ours(model, ids, span_mask, steps, top_p, generator, reward_model=None):
    guide = None
    if reward_model is not None:
        guide = lambda x, state: tess2.reward_guidance(reward_model, x, state.ids, state.span_mask, eta=0.25)  # noqa: E731
    return sample.diffuse(model, ids, span_mask, list(range(len(ids))), steps, top_p, guide)[0]


def rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def worker(a):
    """One measurement in this (fresh) process; prints a JSON line."""
    a.impl, a.vocab = a.impl[0], a.vocab[0]
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # build the weights in their dtype directly (no fp32 copy of a 7B)
    with dev:
        model = Transformer(preset(a.preset, vocab_size=a.vocab, timestep_embed=True, causal=False)).init_weights()
        rm = None
        if a.impl == "ours+guidance":
            rm = Transformer(preset(a.preset, vocab_size=a.vocab, head="score")).init_weights()
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    B, L, prompt = a.batch, a.length, min(32, a.length // 2)
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(a.vocab, (B, L), generator=g, device=dev)
    span_mask = (torch.arange(L, device=dev) >= prompt).expand(B, L).contiguous()
    run = {"released": released_loop, "ours": ours, "ours+guidance": ours, "ours-sort": ours}[a.impl]
    if a.impl == "ours-sort":  # sample.diffuse as it is, with the full-sort definition as its projection
        fused_sampling.project_fast = tess2.project
    kw = dict(reward_model=rm) if rm is not None else {}
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_mb("VmRSS:")
    t0 = time.perf_counter()
    run(model, ids, span_mask, a.steps, 0.99, g, **kw)
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss_mb("VmHWM:") - base
    t0, c0 = time.perf_counter(), time.process_time()
    run(model, ids, span_mask, a.steps, 0.99, g, **kw)
    if cuda:
        torch.cuda.synchronize()
    second, cpu = time.perf_counter() - t0, time.process_time() - c0
    blv = B * L * a.vocab * 4 / 2**20  # one (B, L, V) fp32 tensor, MB
    print(json.dumps(dict(impl=a.impl, preset=a.preset, V=a.vocab, B=B, L=L, steps=a.steps, device=a.device,
                          dtype=a.dtype, threads=torch.get_num_threads(), s_per_step=round(second / a.steps, 4),
                          cpu_s_per_step=round(cpu / a.steps, 4),
                          s_first_run=round(first, 2), seconds=round(second, 2), peak_mb=round(peak),
                          peak_in_BLV=round(peak / blv, 2), BLV_mb=round(blv))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model.PRESETS name for the layers (mistral-7b on a GPU)")
    p.add_argument("--vocab", type=int, nargs="+", default=[512, 32001], help="vocabulary sizes V to measure")
    p.add_argument("--batch", type=int, default=2, help="batch size B")
    p.add_argument("--length", type=int, default=512, help="row length L (the first 32 positions are context)")
    p.add_argument("--steps", type=int, default=10, help="diffusion steps")
    p.add_argument("--impl", nargs="+", default=["released", "ours", "ours+guidance"],
                   help="implementations: released, ours, ours+guidance (reward guidance, G=5, same layers), "
                        "ours-sort (ours with the full-sort definition tess2.project as its projection)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="weights and logits (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--project", action="store_true", help="time tess2.project alone against project_fast")
    p.add_argument("--positions", type=int, nargs="+", default=[64, 256, 1024], help="--project: positions n")
    p.add_argument("--repeats", type=int, default=7, help="--project, --interleaved: timed calls of each (median)")
    p.add_argument("--interleaved", action="store_true", help="released vs --before vs now in one process")
    p.add_argument("--before", default="HEAD", help="--interleaved: the git commit whose diffuse is 'before'")
    p.add_argument("--shipped", action="store_true", help="--interleaved: the shipped model instead of --preset")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        return worker(a)
    if a.project:
        return bench_project(a)
    if a.interleaved:
        return bench_interleaved(a)
    for V in a.vocab:
        for impl in a.impl:
            cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--vocab", str(V), "--preset", a.preset,
                   "--batch", str(a.batch), "--length", str(a.length), "--steps", str(a.steps),
                   "--device", a.device, "--dtype", a.dtype, "--threads", str(a.threads)]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
