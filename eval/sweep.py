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
time writes to OUTPUT. Flags left out take the checkpoint's generation_config.json (--steps too, in
an eta sweep). Refused before any weights load, with one line and nothing written: what eval.intrinsic
refuses, two lists at once, or nothing to sweep. Under torchrun every point's batches are spread over
the processes, and the first measures and writes.
"""
import json
import os
import time

from eval.harness import output_folder
from eval.intrinsic import answers, common_flags, generations_file, load, measure, prepare, produced_by
from eval.metrics import mean_reward
from support.cli import (FLOAT32_MAX, ArgumentParser, atomic_write, fingerprint, number_list, read_marker,
                         run_cli)
from support.prompts import processes


def reward_of(reward, tok, records, made, chat: bool) -> float:
    """Mean reward of BOS + prompt (templated if chat) + response + EOS, as the reward model was trained."""
    import data.chat
    seqs = [(data.chat.encode_prompt(tok, r["prompt"]) if chat else [tok.bos_id] + tok.encode(r["prompt"]))
            + x["tokens"] + [tok.eos_id] for r, x in zip(records, made)]
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


def earlier_points(output, key, fp, remove: bool) -> dict:
    """{swept value: point} of this sweep's earlier run in OUTPUT. Another sweep's files are removed
    (by the process that writes)."""
    state = read_marker(output, "sweep.json") or {}
    if state.get("fingerprint") == fp:
        return {p[key]: p for p in state["points"]}
    old = state.get("key")
    if remove and old in ("steps", "eta"):
        stale = [f"generations_{old}_{p[old]:g}.jsonl" for p in state.get("points", []) if old in p]
        for name in stale + [f"sweep_{old}.md", f"sweep_{old}.png", "sweep.json"]:
            if os.path.exists(os.path.join(output, name)):
                os.unlink(os.path.join(output, name))
    return {}


def parse_args(argv):
    p = ArgumentParser(prog="eval.sweep", description=__doc__.split("\n\n")[0])
    common_flags(p)
    p.add_argument("--steps", type=number_list(int, lo=1),
                   help="diffusion steps: a list to sweep (10,50,100), or one value (default: the checkpoint's)")
    p.add_argument("--eta", type=number_list(float, lo=0),
                   help="guidance step sizes to sweep (0,0.25,0.5); needs a reward model (default: the shipped one)")
    a = p.parse_args(argv)
    if a.eta and max(a.eta) > FLOAT32_MAX:
        p.error(f"--eta must be finite numbers >= 0, got {max(a.eta):g}, over float32's largest (3.4e+38), "
                "which the logits are")
    if a.eta and a.steps and len(a.steps) > 1:
        p.error("sweep one thing at a time: a list for --eta or for --steps, not both")
    if not a.eta and (not a.steps or len(a.steps) == 1):
        p.error("nothing to sweep: give --steps 10,50,100 or --eta 0,0.25,0.5")
    return a


def main(argv=None):
    a = parse_args(argv)
    key, values = ("eta", a.eta) if a.eta else ("steps", a.steps)
    steps = a.steps[0] if key == "eta" and a.steps else None  # an eta sweep's steps (None: the checkpoint's)
    prepared = prepare(a, steps=steps, guided=key == "eta")
    fp = fingerprint(dict(key=key, steps=steps), produced_by(prepared))
    rank = processes()[0]
    with output_folder(a.output):
        done = earlier_points(a.output, key, fp, remove=rank == 0) if os.path.isdir(a.output) else {}
        model, reward, scorer = load(prepared, scorer=rank == 0)
        for v in values:
            if v not in done:
                done[v] = run_point(a, prepared, key, v, steps, model, reward, scorer)
                if rank == 0:
                    atomic_write(os.path.join(a.output, "sweep.json"),
                                 dict(key=key, fingerprint=fp, points=[done[x] for x in values if x in done]))
        if rank > 0:
            return
        points = [done[v] for v in values]
        columns = [c for c in points[0] if c not in (key, "seconds")] + ["seconds"]
        table = write_table(os.path.join(a.output, f"sweep_{key}.md"), key, points, columns)
        plot(os.path.join(a.output, f"sweep_{key}.png"), key, points, [c for c in columns if c != "seconds"])
    print(table)


def run_point(a, prepared, key, v, steps, model, reward, scorer) -> dict | None:
    """Generates and measures one point of the sweep; its generations go to OUTPUT. Only the process
    that writes measures (the others return None)."""
    n, eta = (v, 0.0) if key == "steps" else (steps, v)  # eta 0, not None: None means 0.25
    t0 = time.perf_counter()
    made = answers(prepared, model, reward, steps=n, eta=eta)
    if processes()[0] > 0:
        return None
    texts, records = [x["text"] for x in made], prepared.records
    atomic_write(os.path.join(a.output, f"generations_{key}_{v:g}.jsonl"), generations_file(records, texts))
    point = {key: v, **measure(records, texts, scorer, prepared.scorer and prepared.scorer.tokenizer),
             "seconds": time.perf_counter() - t0}
    if reward is not None:
        point["reward"] = reward_of(reward, prepared.model.tokenizer, records, made, prepared.settings.chat)
    print(json.dumps(point), flush=True)
    return point


if __name__ == "__main__":
    run_cli(main, "eval.sweep")
