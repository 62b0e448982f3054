"""
Figure 3 of the paper: quality against diffusion steps (3b) and against reward-guidance eta (3a).
One table (Markdown and JSON) and one PNG plot per sweep.

    python -m eval.sweep --steps 10,50,100,500 --prompts P.jsonl --scorer S --output out/steps
    python -m eval.sweep --eta 0,0.25,0.5,1 --steps 100 --reward-model R --prompts P.jsonl --output out/eta

Each point generates a continuation of every prompt (same seeds at every point) and measures it as
eval.intrinsic does (perplexity under --scorer, distinct-n, entropy, MAUVE when references are given)
plus, with a reward model, the mean reward of prompt + response. OUTPUT/sweep.json keeps the points
with the fingerprint of what produced them: the model, scorer and reward model (their files), the
tokenizer, the prompts and every setting. A stopped sweep resumes with the same flags; any other
sweep into the same OUTPUT computes every point again and replaces the earlier files. One sweep at a
time writes to OUTPUT.
"""
import json
import os
import time

import sample
from eval.harness import DEFAULT_MODEL, DEFAULT_REWARD_MODEL, resolve_default
from eval.intrinsic import common_flags, measure, setup, write_generations
from eval.metrics import mean_reward
from support.cli import (ArgumentParser, OutputFolder, atomic_write, file_identity, fingerprint, number, number_list,
                         read_marker, run_cli, seed_flag)
from support.hub import resolve


def range_flags(p):
    """common_flags' numeric flags, declared again with their ranges (conflict_handler="resolve")."""
    p.add_argument("--limit", type=number(int, lo=1), help="only the first N prompts")
    p.add_argument("--length", type=number(int, lo=1), default=256, help="positions generated after each prompt")
    p.add_argument("--top-p", type=number(float, lo=0, hi=1, lo_open=True), default=0.99)
    p.add_argument("--batch-size", type=number(int, lo=1), default=8)
    p.add_argument("--seed", type=seed_flag, default=0)
    p.add_argument("--guidance-steps", type=number(int, lo=1))
    p.add_argument("--steps", type=number_list(int, lo=1), default=[100],
                   help="diffusion steps: one value, or a list to sweep (10,50,100)")
    p.add_argument("--eta", type=number_list(float, lo=0), help="guidance step sizes to sweep (0,0.25,0.5); "
                                                                "needs a reward model")


def reward_of(reward, tok, rows, gens, chat: bool) -> float:
    """Mean reward of BOS + prompt (templated if chat) + response + EOS, as the reward model was trained."""
    import data.chat
    seqs = [(data.chat.encode_prompt(tok, r["prompt"]) if chat else [tok.bos_id] + tok.encode(r["prompt"]))
            + g.tokens + [tok.eos_id] for r, g in zip(rows, gens)]
    return mean_reward(reward, seqs, tok.pad_id)


def write_table(path, key, points, columns) -> str:
    lines = [f"| {key} | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    lines += [f"| {p[key]:g} | " + " | ".join(f"{p[c]:.3f}" if isinstance(p.get(c), float) else str(p.get(c, ""))
                                             for c in columns) + " |" for p in points]
    text = "\n".join(lines) + "\n"
    atomic_write(path, text)
    return text


def plot(path, key, points, columns):
    """One panel per metric against the swept value (Figure 3's layout), written atomically."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3), squeeze=False)
    xs = [p[key] for p in points]
    for ax, c in zip(axes[0], columns):
        ax.plot(xs, [p[c] for p in points], marker="o")
        ax.set_xlabel(key)
        ax.set_title(c)
        if key == "steps" and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, png.getvalue())


def sweep_key(a, key, steps, rows, model, tok, scorer, settings) -> str:
    """The fingerprint of what a sweep's points depend on (all but the swept value)."""
    def files(path, default):  # what a checkpoint folder holds, found as eval.intrinsic.load finds it
        return file_identity(resolve(resolve_default(path, default)))
    reward = files(a.reward_model or DEFAULT_REWARD_MODEL, DEFAULT_REWARD_MODEL) if settings["reward_model"] else None
    knobs = {k: v for k, v in settings.items() if k not in ("reward_model", "reward_tokenizer")}
    return fingerprint(dict(
        key=key, steps=steps[0] if key == "eta" else None, prompts=rows, settings=knobs,
        model=files(a.model, DEFAULT_MODEL), tokenizer=tok.meta() | {"tokenizer": None},
        scorer=files(a.scorer, DEFAULT_MODEL) if scorer is not None else None, reward_model=reward,
        device=str(model.embed_tokens.weight.device), dtype=str(model.embed_tokens.weight.dtype)))


def earlier_points(output, key, fp) -> dict:
    """{swept value: point} of this sweep's earlier run in OUTPUT. Another sweep's files are removed."""
    state = read_marker(output, "sweep.json") or {}
    if state.get("fingerprint") == fp:
        return {p[key]: p for p in state["points"]}
    old = state.get("key")
    if old in ("steps", "eta"):
        stale = [f"generations_{old}_{p[old]:g}.jsonl" for p in state.get("points", []) if old in p]
        for name in stale + [f"sweep_{old}.md", f"sweep_{old}.png", "sweep.json"]:
            if os.path.exists(os.path.join(output, name)):
                os.unlink(os.path.join(output, name))
    return {}


def main(argv=None):
    p = ArgumentParser(prog="eval.sweep", description=__doc__.split("\n\n")[0], conflict_handler="resolve")
    common_flags(p)
    range_flags(p)
    a = p.parse_args(argv)
    steps, etas = a.steps, a.eta
    if etas and len(steps) > 1:
        raise ValueError("sweep one thing at a time: a list for --eta or for --steps, not both")
    if not etas and len(steps) == 1:
        raise ValueError("nothing to sweep: give --steps 10,50,100 or --eta 0,0.25,0.5")
    key, values = ("eta", etas) if etas else ("steps", steps)
    with OutputFolder(a.output, "--output"):
        rows, model, tok, scorer, scorer_tok, settings = setup(a)
        fp = sweep_key(a, key, steps, rows, model, tok, scorer, settings)
        done = earlier_points(a.output, key, fp)
        for v in values:
            if v not in done:
                done[v] = run_point(a, key, v, steps, rows, model, tok, scorer, scorer_tok, settings)
                atomic_write(os.path.join(a.output, "sweep.json"),
                             dict(key=key, fingerprint=fp, points=[done[x] for x in values if x in done]))
        points = [done[v] for v in values]
        columns = [c for c in points[0] if c not in (key, "seconds")] + ["seconds"]
        table = write_table(os.path.join(a.output, f"sweep_{key}.md"), key, points, columns)
        plot(os.path.join(a.output, f"sweep_{key}.png"), key, points, [c for c in columns if c != "seconds"])
    print(table)


def run_point(a, key, v, steps, rows, model, tok, scorer, scorer_tok, settings) -> dict:
    """Generates and measures one point of the sweep; its generations go to OUTPUT."""
    n, eta = (v, 0.0) if key == "steps" else (steps[0], v)  # eta 0, not None: None means 0.25
    t0 = time.perf_counter()
    gens = sample.generate(model, tok, [r["prompt"] for r in rows], steps=n, eta=eta, details=True, **settings)
    texts = [g.text for g in gens]
    write_generations(os.path.join(a.output, f"generations_{key}_{v:g}.jsonl"), rows, texts)
    point = {key: v, **measure(rows, texts, scorer, scorer_tok), "seconds": time.perf_counter() - t0}
    if settings["reward_model"] is not None:
        point["reward"] = reward_of(settings["reward_model"], tok, rows, gens, a.chat)
    print(json.dumps(point), flush=True)
    return point


if __name__ == "__main__":
    run_cli(main, "eval.sweep")
