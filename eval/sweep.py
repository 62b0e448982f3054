"""
Figure 3 of the paper: quality against diffusion steps (3b) and against reward-guidance eta (3a).
One table (Markdown and JSON) and one PNG plot per sweep.

    python -m eval.sweep --steps 10,50,100,500 --prompts P.jsonl --scorer S --output out/steps
    python -m eval.sweep --eta 0,0.25,0.5,1 --steps 100 --reward-model R --prompts P.jsonl --output out/eta

Each point generates a continuation of every prompt (same seeds at every point) and measures it as
eval.intrinsic does (perplexity under --scorer, distinct-n, entropy, MAUVE when references are given)
plus, with a reward model, the mean reward of prompt + response. Points already in OUTPUT/sweep.json
are kept: a stopped sweep resumes.
"""
import argparse
import json
import os
import time

import sample
from support.cli import atomic_write, run_cli
from eval.intrinsic import common_flags, measure, setup, write_generations
from eval.metrics import mean_reward


def parse_values(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{flag} wants comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"--{flag} is empty")
    return values


def reward_of(reward, tok, rows, gens, chat: bool) -> float:
    """Mean reward of BOS + prompt (templated if chat) + response + EOS, as the reward model was trained."""
    import data.chat
    seqs = [(data.chat.encode_prompt(tok, r["prompt"]) if chat else [tok.bos_id] + tok.encode(r["prompt"]))
            + g.tokens + [tok.eos_id] for r, g in zip(rows, gens)]
    return mean_reward(reward, seqs, tok.pad_id)


def write_table(path, key, points, columns):
    lines = [f"| {key} | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    lines += [f"| {p[key]:g} | " + " | ".join(f"{p[c]:.3f}" if isinstance(p.get(c), float) else str(p.get(c, ""))
                                             for c in columns) + " |" for p in points]
    atomic_write(path, "\n".join(lines) + "\n")


def plot(path, key, points, columns):
    """One panel per metric against the swept value (Figure 3's layout), written atomically."""
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
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="eval.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common_flags(p)
    p.add_argument("--steps", default="100", help="diffusion steps: one value, or a list to sweep (10,50,100)")
    p.add_argument("--eta", help="guidance step sizes to sweep (0,0.25,0.5); needs a reward model")
    a = p.parse_args(argv)
    steps = parse_values(a.steps, int, "steps")
    etas = parse_values(a.eta, float, "eta") if a.eta else None
    if etas and len(steps) > 1:
        raise ValueError("sweep one thing at a time: a list for --eta or for --steps, not both")
    if not etas and len(steps) == 1:
        raise ValueError("nothing to sweep: give --steps 10,50,100 or --eta 0,0.25,0.5")
    key, values = ("eta", etas) if etas else ("steps", steps)
    rows, model, tok, scorer, scorer_tok, settings = setup(a)
    reward = settings["reward_model"]
    state_path = os.path.join(a.output, "sweep.json")
    done = {}
    if os.path.exists(state_path):
        with open(state_path) as f:
            done = {p[key]: p for p in json.load(f)["points"]}
    points = []
    for v in values:
        if v not in done:
            n, eta = (v, 0.0) if key == "steps" else (steps[0], v)  # eta 0, not None: None means 0.25
            t0 = time.perf_counter()
            gens = sample.generate(model, tok, [r["prompt"] for r in rows], steps=n, eta=eta,
                                   details=True, **settings)
            texts = [g.text for g in gens]
            write_generations(os.path.join(a.output, f"generations_{key}_{v:g}.jsonl"), rows, texts)
            point = {key: v, **measure(rows, texts, scorer, scorer_tok), "seconds": time.perf_counter() - t0}
            if reward is not None:
                point["reward"] = reward_of(reward, tok, rows, gens, a.chat)
            done[v] = point
            atomic_write(state_path, dict(key=key, points=[done[x] for x in values if x in done]))
            print(json.dumps(point), flush=True)
        points.append(done[v])
    columns = [c for c in points[0] if c not in (key, "seconds")] + ["seconds"]
    write_table(os.path.join(a.output, f"sweep_{key}.md"), key, points, columns)
    plot(os.path.join(a.output, f"sweep_{key}.png"), key, points, [c for c in columns if c != "seconds"])
    print(open(os.path.join(a.output, f"sweep_{key}.md")).read())


if __name__ == "__main__":
    run_cli(main, "eval.sweep")
