"""
Measurements of the miniature run (eval/miniature.sh), written to OUT/results.json and OUT/results.md:

  adaptation   held-out diffusion loss of adapt-from-AR vs adapt-from-scratch, same steps (Table 1 / Fig. 2)
  steps        quality vs diffusion steps (Fig. 3b)
  eta          mean reward and perplexity vs reward-guidance eta (Fig. 3a)
  settling     the step at which predictions stop changing (Sec. 5.3 / Fig. 4), plus an --html page

Generations answer held-out "Continue this speech by ..." chats (plays never trained on). Their
perplexity is measured under a held-out AR model, SmolLM2-135M-Instruct by default (data/smollm2.py;
the paper uses GPT-NeoX 1.3B): the speech's opening lines and the generated text are re-tokenised
with the scorer's own tokenizer. For the miniature adapted from SmolLM2 itself that scorer is not
held out (nothing else is at hand offline), and results.md says so. distinct-n and entropy count
words; the reward (with --rm) is the miniature's reward model on the chat-formatted prompt +
response + EOS, as it was trained. "who" accuracy is exact match of the answered speaker on
held-out "Who says this ...?" chats.

    python -m eval.miniature --out out/miniature --sft .../sft/step-N [--rm .../rm/step-N] [--scorer DIR]
"""
import argparse
import json
import os
import time

import torch

from data.chat import format_prompt
from eval.metrics import distinct_n, mean_reward, perplexity, unigram_entropy
from model import Transformer
from sample import generate
from support.tokenizer import Tokenizer
from support.views import write_html


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def scored_perplexity(scorer, scorer_tok, chats, texts):
    """Perplexity of each text as the continuation of its speech's opening lines, under the scorer,
    both re-tokenised with the scorer's tokenizer: opening lines + "\n" | text. No BOS: the scorer's
    own (SmolLM2-Instruct's is <|im_start|>, a chat role marker) need not suit plain text."""
    lines = [c["user"].split("\n", 1)[1] for c in chats]
    prompts = [scorer_tok.encode(x + "\n") for x in lines]
    continuations = [scorer_tok.encode(t.strip()) for t in texts]
    if not any(continuations):  # every answer empty (a barely trained model ends at once): nothing to score
        return float("nan")
    return perplexity(scorer, prompts, continuations)


def quality(gens, chats, tok, scorer, rm):
    """Metrics of continuations: perplexity under the scorer (model, tokenizer), distinct-1..4,
    entropy, mean reward (if a reward model is given)."""
    texts = [g.text for g in gens]
    metrics = dict(perplexity=scored_perplexity(*scorer, chats, texts),
                   **{f"distinct_{n}": distinct_n(texts, n) for n in range(1, 5)},
                   entropy=unigram_entropy(texts), mean_words=sum(len(t.split()) for t in texts) / len(texts))
    if rm is not None:
        seqs = [[tok.bos_id] + tok.encode(format_prompt(c["user"])) + g.tokens + [tok.eos_id]
                for c, g in zip(chats, gens)]
        metrics["reward"] = mean_reward(rm, seqs, tok.pad_id)
    return metrics


def settling(gens):
    """Per row, the first step after which the argmax of the generated region never changes,
    as a fraction of the steps; and the share of final tokens already in place at 10%..100%."""
    fractions, curve = [], torch.zeros(10)
    for g in gens:
        preds = g.predictions  # (n, L)
        p = preds[:, (g.confidence < 1.0).any(0)]  # (n, generated positions): the prompt's confidence is 1
        n = p.size(0)
        changed = (p[1:] != p[:-1]).any(-1).nonzero()
        fractions.append(((changed.max().item() + 2) if len(changed) else 1) / n)
        for j in range(10):
            curve[j] += (p[max(0, round((j + 1) / 10 * n) - 1)] == p[-1]).float().mean()
    return dict(settle_fraction_mean=sum(fractions) / len(fractions),
                settle_fraction_median=sorted(fractions)[len(fractions) // 2],
                final_tokens_in_place=[round(x, 3) for x in (curve / len(gens)).tolist()])


def adaptation(out):
    """Held-out diffusion loss along training, from each run's log.jsonl ({} if the runs are not in out)."""
    table = {}
    for run in ("adapt", "adapt-scratch"):
        if not os.path.exists(os.path.join(out, run, "log.jsonl")):  # e.g. measuring a shipped model alone
            return {}
        with open(os.path.join(out, run, "log.jsonl")) as f:
            table[run] = {entry["step"]: entry["val_loss"] for entry in map(json.loads, f) if "val_loss" in entry}
    return table


def markdown(results, cmd):
    md = [f"Measured by `{cmd}` ({results['seconds']:.0f} s for the measurements). Perplexity under "
          f"`{results['scorer']}`, re-tokenised; the plays' true continuations of the same prompts score "
          f"{results['reference_perplexity']:.1f}."]
    if results["adaptation"]:
        md += ["", "### Adaptation vs scratch: held-out diffusion loss (val plays)", "",
               "| step | adapted from AR | from scratch |", "| --- | --- | --- |"]
        a, s = results["adaptation"]["adapt"], results["adaptation"]["adapt-scratch"]
        md += [f"| {k} | {a[k]:.3f} | {s.get(k, float('nan')):.3f} |" for k in sorted(a, key=int)]
    names = ["perplexity", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "entropy", "reward", "mean_words",
             "who_accuracy"]
    for name, key in (("Quality vs diffusion steps", "steps"), ("Reward guidance", "eta")):
        if not results[key]:
            continue
        cols = [c for c in names if c in results[key][0]]
        md += ["", f"### {name}", "", f"| {key} | " + " | ".join(cols) + " | seconds |",
               "| --- " * (len(cols) + 2) + "|"]
        for row in results[key]:
            md.append(f"| {row[key]} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + f" | {row['seconds']:.0f} |")
    md += ["", "### Samples (the first two held-out prompts)", ""]
    for c, k in zip(results["prompts"], range(2)):
        md += [f"Prompt {k + 1}: " + c.replace("\n", " / ")]
        md += [f"- {s['steps']} steps: " + (s["texts"][k].replace("\n", " / ") or "(empty)") for s in results["samples"]]
        md += [""]
    st = results["settling"]
    md += ["### When predictions settle", "",
           f"Over {st['rows']} rows at {st['steps']} steps: the argmax of the generated region stops changing "
           f"after {100 * st['settle_fraction_mean']:.0f}% of the steps on average (median "
           f"{100 * st['settle_fraction_median']:.0f}%). Share of final tokens already in place at 10%, 20%, ... "
           f"100% of the steps: {', '.join(f'{x:.2f}' for x in st['final_tokens_in_place'])}. Page: `{st['html']}`."]
    return "\n".join(md) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the miniature's output folder (data/ and the runs' logs)")
    p.add_argument("--sft", required=True, help="instruction-tuned diffusion checkpoint to sample from")
    p.add_argument("--rm", help="reward model checkpoint (without it: no reward column, no eta sweep)")
    p.add_argument("--scorer", help="causal LM checkpoint that judges perplexity, with its tokenizer "
                   "(default: SmolLM2-135M-Instruct, converted once by data/smollm2.py)")
    p.add_argument("--prompts", type=int, default=16, help="held-out chats per measurement")
    p.add_argument("--who", type=int, help="held-out 'who says this' chats per steps row (default --prompts; 0: none)")
    p.add_argument("--length", type=int, default=64, help="positions generated per prompt")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 25, 50, 100], help="steps sweep")
    p.add_argument("--etas", type=float, nargs="+", default=[0, 0.1, 0.25, 0.5, 1, 2, 4], help="eta sweep")
    p.add_argument("--eta-steps", type=int, default=25, help="diffusion steps in the eta sweep")
    p.add_argument("--smoke", action="store_true", help="tiny sweeps (CI)")
    p.add_argument("--ship", help="also save the sft and reward models in bf16 to DIR/tess2-shakespeare{,-rm}")
    a = p.parse_args(argv)
    if a.smoke:
        a.prompts, a.length, a.steps, a.etas, a.eta_steps = 2, 8, [2, 4], [0, 0.5], 2
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.scorer is None:
        from data.smollm2 import ensure
        a.scorer = str(ensure())
    torch.manual_seed(0)
    t0 = time.time()
    tok = Tokenizer(a.sft)
    scorer = (Transformer.from_pretrained(a.scorer, verbose=False).eval(), Tokenizer(a.scorer))
    model = Transformer.from_pretrained(a.sft, verbose=False).eval()
    rm = Transformer.from_pretrained(a.rm, verbose=False).eval() if a.rm else None
    chats = read_jsonl(os.path.join(a.out, "data", "sft_val.jsonl"))
    cont = [c for c in chats if c["task"] == "continue"][: a.prompts]
    who = [c for c in chats if c["task"] == "who"][: a.prompts if a.who is None else a.who]
    users = [c["user"] for c in cont]
    results = dict(adaptation=adaptation(a.out), steps=[], eta=[], scorer=a.scorer, prompts=users[:2],
                   reference_perplexity=scored_perplexity(*scorer, cont, [c["assistant"] for c in cont]))

    def run(steps, who_accuracy=False, **kw):
        t = time.time()
        gens = generate(model, tok, users, steps=steps, length=a.length, batch_size=a.prompts, details=True, **kw)
        metrics = quality(gens, cont, tok, scorer, rm)
        if who_accuracy and who:
            answers = generate(model, tok, [c["user"] for c in who], steps=steps, length=16, batch_size=a.prompts)
            metrics["who_accuracy"] = sum(x.strip() == c["assistant"] for x, c in zip(answers, who)) / len(who)
        return gens, dict(metrics, seconds=time.time() - t)

    for n in a.steps:
        gens, metrics = run(n, who_accuracy=True, record=n == 100 or n == a.steps[-1])
        results["steps"].append(dict(steps=n, **metrics))
        results.setdefault("samples", []).append(dict(steps=n, texts=[g.text for g in gens[:2]]))
        if gens[0].predictions is not None:
            kept = gens
        print(f"steps {n}: {metrics}", flush=True)
    for eta in a.etas if rm is not None else []:
        _, metrics = run(a.eta_steps, reward_model=rm if eta else None, eta=eta or None)
        results["eta"].append(dict(eta=eta, **metrics))
        print(f"eta {eta}: {metrics}", flush=True)
    write_results(a, results, tok, kept, t0)
    if a.ship:
        if rm is None:
            raise ValueError("--ship writes the diffusion model and the reward model: pass --rm")
        for src, name in ((model, "tess2-shakespeare"), (rm, "tess2-shakespeare-rm")):
            src.to(torch.bfloat16).save_pretrained(os.path.join(a.ship, name), tokenizer_from=a.sft)
    print(open(os.path.join(a.out, "results.md")).read())


def write_results(a, results, tok, kept, t0):
    """results.json, results.md and the settling page (of the generations recorded) in a.out."""
    html = os.path.join(a.out, "settling.html")
    write_html(html, tok, kept[:4])
    results["settling"] = dict(settling(kept), rows=len(kept), steps=len(kept[0].predictions), html=html)
    results["seconds"] = time.time() - t0
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(markdown(results, "bash eval/miniature.sh" + (" (SMOKE=1)" if a.smoke else "")))


if __name__ == "__main__":
    from support.cli import run_cli
    run_cli(main, "eval.miniature")
