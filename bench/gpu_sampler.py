"""
(c) The sampler at the paper's shape: 8 rows x 2048 positions (the first 64 context), Mistral-7B
layer sizes with V = 32001, random bf16 weights. Each configuration runs sample.diffuse itself for
3 + 11 steps: a CUDA event at every step's end (on_step) gives the steady-state time of the last 10
steps (the projection and any compiled graph warmed up by then), and events around the calls diffuse
makes give the phases: the model (tess2.predict, which includes the softmax + mix of Eq. 8, timed
alone on the same shapes beside it), guidance, projection, re-noising; "other" is the rest of the
step (each row's argmax, bookkeeping). Configurations: eager with nucleus top-p 0.99 and with
argmax at --layers (32) and at --small-layers (4), reward guidance (G = 1, a reward model of
--small-layers layers, frozen and recomputed as sample.py runs it on CUDA), torch.compile of
tess2.predict (default mode; sample.py's own --compile runs in section b), and the released loop
(bench/bench_sample.py's restatement) on the same model. Then each figure extrapolated to 32 layers
and 100 steps beside the paper's 77 s, and the projection alone on peaked and flat logits.
Random weights give broad logits: the nucleus keeps many tokens, the projection's costly case.
The sampler's internals are found under their new names (support/fused_sampling.py: project_spans,
renoise_spans_, project_fast) or today's (sample.project, sample.renoise_, tess2.project).
"""
import collections
import contextlib
import dataclasses
import importlib
import statistics

import torch

import gpu_common
import sample
import tess2
from bench_sample import released_loop, sort_project
from model import Transformer, preset
from support import flops

try:
    fused_sampling = importlib.import_module("support.fused_sampling")
except ImportError:
    fused_sampling = None

PAPER_S = 77.0  # the paper's Limitations: about 77 s per batch of 8 x 2048, 100 steps
WARM, TIMED = 3, 10  # untimed steps first (the first has no projection and, compiled, its own graph)
PHASES = {"projection": ("project_spans", "project"), "re-noising": ("renoise_spans_", "renoise_")}
COLUMNS = ("model", "guidance", "projection", "re-noising")


def outer_only(s, pairs, f, inside):
    """f, recording (start, end) marks into pairs around each call that is not inside another
    recorded call of the same phase (inside: a one-element flag shared by that phase's wrappers)."""
    def wrapper(*args, **kw):
        if inside[0]:
            return f(*args, **kw)
        inside[0] = True
        try:
            start = s.mark()
            out = f(*args, **kw)
            pairs.append((start, s.mark()))
            return out
        finally:
            inside[0] = False
    return wrapper


@contextlib.contextmanager
def timed_phases(s, calls):
    """Wraps, for the while, each function of PHASES wherever it is (sample, support.fused_sampling)."""
    patched = []
    for phase, names in PHASES.items():
        inside = [False]
        for module in filter(None, (sample, fused_sampling)):
            for name in names:
                f = getattr(module, name, None)
                if callable(f):
                    setattr(module, name, outer_only(s, calls[phase], f, inside))
                    patched.append((module, name, f))
    try:
        yield
    finally:
        for module, name, f in reversed(patched):
            setattr(module, name, f)


def measure(s, net, batch, top_p, predict=None, guide=None):
    """sample.diffuse for WARM + TIMED + 1 steps: ms per steady step (median, min, max), each phase's
    median ms over the same steps, peak GB."""
    ids, span_mask = batch
    predict = predict or tess2.predict
    marks, calls = [], collections.defaultdict(list)
    s.reset_peak()
    original = tess2.predict  # sample.py calls tess2.predict: timed (and, compiled, replaced) for the run
    tess2.predict = outer_only(s, calls["model"], predict, [False])
    try:
        with timed_phases(s, calls):
            sample.diffuse(net, ids, span_mask, list(range(len(ids))), steps=WARM + TIMED + 1, top_p=top_p,
                           guide=outer_only(s, calls["guidance"], guide, [False]) if guide else None,
                           on_step=lambda *_: marks.append(s.mark()))
    finally:
        tess2.predict = original
    s.sync()
    steps = [s.ms(a, b) for a, b in zip(marks[WARM:-1], marks[WARM + 1:])]
    phases = {k: statistics.median(s.ms(a, b) for a, b in pairs[WARM:]) for k, pairs in calls.items() if pairs[WARM:]}
    return dict(step_ms=statistics.median(steps), min_ms=min(steps), max_ms=max(steps), timed=len(steps),
                peak_gb=s.peak_gb(), **phases)


def mix_ms(s, B, L, V):
    """tess2.predict's softmax + mix (Eq. 8) and the cast before p @ E, alone, on (B, L, V)."""
    g = torch.Generator(device=s.dev).manual_seed(0)
    S = 5 * torch.randn(B, L, V, generator=g, device=s.dev)
    prev = torch.randn(B, L, V, generator=g, device=s.dev).to(s.dtype)

    def mix():
        p = torch.softmax(S.float(), dim=-1)
        p.add_(torch.softmax(prev.float(), dim=-1))
        return p.mul_(0.5).to(s.dtype)
    return s.median_ms(mix, reps=TIMED)


def released_ms(s, net, batch):
    """The released loop's steady ms per step: (a run of 2 + TIMED steps - a run of 2) / TIMED."""
    ids, span_mask = batch

    def run(steps):
        start = s.mark()
        released_loop(net, ids, span_mask, steps, 0.99, torch.Generator(device=s.dev).manual_seed(0))
        return s.ms(start, s.mark())
    run(2)  # warm-up
    s.reset_peak()
    short, long = run(2), run(2 + TIMED)
    return dict(step_ms=(long - short) / TIMED, peak_gb=s.peak_gb())


def guidance(rm, batch, cuda):
    """guide(logits, state) as sample.run makes it: G = 1, eta 0.25, frozen reward model, recomputed on CUDA."""
    def guide(x, state):
        last = torch.tensor(state.lengths, device=x.device) - 1  # the reward reads each row's last position
        with sample.guidance_mode(rm, cuda):
            return tess2.reward_guidance(rm, x, state.ids, state.span_mask, 0.25, 1, 1.0, last_index=last)
    return guide


class Results:
    """The measured configurations: a table row each, kept for the extrapolation."""

    def __init__(self, s, shape, mix):
        self.s, self.shape, self.mix, self.rows = s, shape, mix, {}
        B, L, _ = shape
        self.tokens = B * L
        self.header()

    def header(self):
        self.s.table("configuration", "layers", f"s/step (median of {TIMED})", "min - max", "model ms",
                     "of which softmax + mix (alone) ms", "guidance ms", "projection ms", "re-noising ms", "other ms",
                     "model TFLOP/s", "peak GB")

    def add(self, label, net, r, rm=None):
        """Row `label` (its key: label and layers) from measure's or released_ms's r."""
        args, n = net.args, net.num_params()
        r.update(label=label, layers=args.num_hidden_layers,
                 model_flops=flops.flops_per_token(args, n, self.shape[1], "sample"))
        if rm is not None:  # its FLOPs now and with 32 layers, for the extrapolation
            with torch.device("meta"):
                rm32 = Transformer(dataclasses.replace(rm.args, num_hidden_layers=32))
            r["guidance_flops"] = flops.guidance_flops(rm.args, rm.num_params(), self.shape[1])
            r["guidance_flops_32"] = flops.guidance_flops(rm32.args, rm32.num_params(), self.shape[1])
            r["rm_layers"] = rm.args.num_hidden_layers
        self.rows[f"{label}, {r['layers']} layers"] = r
        phases = [r.get(k) for k in COLUMNS]
        other = r["step_ms"] - sum(x for x in phases if x is not None) if "model" in r else None
        cell = lambda x: "" if x is None else f"{x:.1f}"  # noqa: E731
        tf = self.tokens * r["model_flops"] / r["model"] / 1e9 if "model" in r else None
        self.s.row(label, r["layers"], f"{r['step_ms'] / 1e3:.3f}",
                   f"{r['min_ms'] / 1e3:.3f} - {r['max_ms'] / 1e3:.3f}" if "min_ms" in r else "",
                   cell(r.get("model")), cell(self.mix) if "eager" in label else "", *map(cell, phases[1:]),
                   cell(other), "" if tf is None else f"{tf:.3g}", cell(r["peak_gb"]) if self.s.cuda else "")
        self.s.record(**{f"c: {label}, {r['layers']} layers": r})


def extrapolate(s, res, big, small, shown):
    """The rows not in `shown` at 32 layers and 100 steps: measured at 32, or their time plus (32 - layers)
    times the eager per-layer slope (eager top-p at two layer counts), guidance scaled by its FLOPs."""
    t = {r["layers"]: r["step_ms"] for r in res.rows.values() if r["label"] == "eager, top-p 0.99"}
    if len(t) < 2:
        s.write("\n(no extrapolation: eager top-p was not measured at two layer counts)")
        return
    slope = (t[big] - t[small]) / (big - small)
    if not shown:
        s.write(f"\nPer layer (eager top-p, {small} vs {big} layers): {slope:.1f} ms; the rest of a step, "
                f"{t[small] - small * slope:.1f} ms, does not grow with the layers.")
    s.table("configuration", "measured at", "s/step at 32 layers", "100 steps, s", "paper's 77 s / ours", "how")
    for key, r in res.rows.items():
        if key in shown:
            continue
        ms, how = r["step_ms"] + (32 - r["layers"]) * slope, "measured" if r["layers"] == 32 else "+ eager slope"
        if "guidance" in r and r["rm_layers"] != 32:
            ms += r["guidance"] * (r["guidance_flops_32"] / r["guidance_flops"] - 1)
            how += ", guidance scaled by its FLOPs at 32 reward-model layers"
        shown[key] = ms / 10
        s.row(r["label"], f"{r['layers']} layers", f"{ms / 1e3:.3f}", f"{ms / 10:.1f}", f"{PAPER_S / (ms / 10):.2f}x",
              how)
    s.record(c_extrapolated_s_per_100_steps=shown)


def projection_alone(s, V, n):
    """The projection of one row's span, (n, V) logits in the model's dtype, top-p 0.99: the exact fast
    nucleus against the full sort, on peaked (Zipf, s = 2) and flat (N(0, 1)) logits."""
    fast = getattr(fused_sampling, "project_fast", None) or tess2.project
    full_sort = tess2.project if fast is not tess2.project else sort_project
    g = torch.Generator(device=s.dev).manual_seed(0)
    zipf = -2.0 * torch.rand(n, V, generator=g, device=s.dev).argsort(-1).add(1).float().log()
    s.table("logits", "positions x V", "fast nucleus ms", "full sort ms", "sort / fast")
    flat = torch.randn(n, V, generator=g, device=s.dev)
    for kind, logits in (("peaked (Zipf s = 2)", zipf), ("flat (N(0, 1))", flat)):
        logits = logits.to(s.dtype)
        times = [s.median_ms(lambda: f(logits, 0.99, torch.Generator(device=s.dev).manual_seed(1)), reps=5)
                 for f in (fast, full_sort)]
        s.row(kind, f"{n} x {V}", f"{times[0]:.2f}", f"{times[1]:.2f}", f"{times[1] / times[0]:.1f}x")


def shapes(a):
    """(B, L, V, context), the diffusion model's and the reward model's ModelArgs at a number of layers."""
    if a.cpu_smoke:
        model = lambda n: preset("tiny", timestep_embed=True, causal=False, num_hidden_layers=n)  # noqa: E731
        reward = lambda n: preset("tiny", head="score", num_hidden_layers=n)  # noqa: E731
        return (2, 64, 512, 16), model, reward
    model = lambda n: preset("tess2-7b", num_hidden_layers=n)  # noqa: E731
    reward = lambda n: preset("mistral-7b", vocab_size=32001, head="score", num_hidden_layers=n)  # noqa: E731
    return (8, 2048, 32001, 64), model, reward


def main():
    p = gpu_common.parser(__doc__)
    p.add_argument("--layers", type=int, default=32, help="layers of the full-size runs (32: no extrapolation)")
    p.add_argument("--small-layers", type=int, default=4, help="layers of the compiled, guided and slope runs")
    a = p.parse_args()
    s = gpu_common.Section(a, "c-sampler", "(c) The sampler at the paper's shape")
    (B, L, V, context), model_args, reward_args = shapes(a)
    big, small = (2, 1) if a.cpu_smoke else (a.layers, a.small_layers)
    g = torch.Generator(device=s.dev).manual_seed(0)
    batch = (torch.randint(3, V, (B, L), generator=g, device=s.dev),
             (torch.arange(L, device=s.dev) >= context).expand(B, L).contiguous())
    s.write(f"\nBatch {B} x {L} ({context} context), V {V}, {str(s.dtype)[6:]}, {WARM} + {TIMED} steps per run. "
            "Times in ms unless marked s; model TFLOP/s = support/flops.py's sampler-step FLOPs / model ms.")
    mix = s.part("softmax + mix alone", lambda: mix_ms(s, B, L, V))
    res = Results(s, (B, L, V), mix)
    step_s = [1.0 if s.cuda else 0.05]  # a guess until the first run, then the last measured step

    def run(label, net, top_p, needs_steps=WARM + TIMED + 3, needs_s=0.0, rm=None, **kw):
        """Measures and adds a row, if needs_s seconds or needs_steps steps of the last run are left."""
        def go():
            r = measure(s, net, batch, top_p, **kw)
            step_s[0] = r["step_ms"] / 1e3
            res.add(label, net, r, rm)
        return s.part(f"{label}, {net.args.num_hidden_layers} layers", go, needs=max(needs_s, needs_steps * step_s[0]))

    net = s.random_model(model_args(big))
    run("eager, top-p 0.99", net, 0.99, needs_steps=0)
    s.headline(headline(res, big))
    s.part("released loop", lambda: res.add("released loop, top-p 0.99", net, released_ms(s, net, batch)),
           needs=(2 * TIMED + 6) * step_s[0])
    run("eager, argmax", net, None)
    del net
    net = s.random_model(model_args(small))
    run("eager, top-p 0.99", net, 0.99, needs_steps=2)
    run("eager, argmax", net, None, needs_steps=2)
    rm = s.random_model(reward_args(small))
    run("eager, top-p 0.99, guided (G = 1)", net, 0.99, needs_steps=30, guide=guidance(rm, batch, s.cuda), rm=rm)
    shown = {}  # the rows extrapolated so far: these now, the compiled ones after compiling (which may not fit)
    s.part("extrapolation", lambda: extrapolate(s, res, big, small, shown))
    s.part("projection alone", lambda: projection_alone(s, V, L - context), needs=3)
    compiled = torch.compile(tess2.predict, fullgraph=True, **({} if s.cuda else {"backend": "eager"}))
    s.write("\ntorch.compile(tess2.predict, fullgraph=True), default mode" +
            (" (backend 'eager' in the CPU smoke: dynamo only):" if a.cpu_smoke else ":"))
    res.header()
    run("compiled, top-p 0.99", net, 0.99, needs_s=40 if s.cuda else 5, predict=compiled)  # compiling: ~30 s?
    run("compiled, argmax", net, None, predict=compiled)
    if any(k not in shown for k in res.rows):
        s.part("extrapolation of the compiled runs", lambda: extrapolate(s, res, big, small, shown))
    s.finish(headline(res, big))


def headline(res, big):
    r = res.rows.get(f"eager, top-p 0.99, {big} layers")
    if r is None:
        return "no steady-state figure"
    return (f"eager top-p 0.99 at {r['layers']} layers: {r['step_ms'] / 1e3:.3f} s/step, 100 steps "
            f"{r['step_ms'] / 10:.1f} s (paper: 77 s)")

if __name__ == "__main__":
    main()
