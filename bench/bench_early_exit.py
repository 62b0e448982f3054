"""
Early exit on the shipped miniature: for each stopping rule, the share of diffusion steps it
saves and the share of outputs identical to the full run's, over a set of prompts.

    python bench/bench_early_exit.py [--prompts 16] [--steps 100]

One full run records every row's argmax at every step (sample.generate with
record=True). A row that exits at step n outputs its argmax at step n and the other rows go on
unchanged, so each rule is evaluated on that one recording.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
from model import Transformer  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402

PROMPTS = [f"Continue this speech by {who}:\n{line}" for who, line in [
    ("Brutus from Julius Caesar", "Romans, countrymen, and lovers! hear me for my cause,"),
    ("Hamlet from Hamlet", "To be, or not to be: that is the question:"),
    ("Portia from The Merchant of Venice", "The quality of mercy is not strain'd,"),
    ("Macbeth from Macbeth", "Is this a dagger which I see before me,"),
    ("Juliet from Romeo and Juliet", "O Romeo, Romeo! wherefore art thou Romeo?"),
    ("Richard from Richard III", "Now is the winter of our discontent"),
    ("Jaques from As You Like It", "All the world's a stage,"),
    ("Henry from Henry V", "Once more unto the breach, dear friends, once more;"),
]] + [f"Who says this in {play}?\n{line}" for play, line in [
    ("Hamlet", "Frailty, thy name is woman!"), ("Macbeth", "Out, damned spot! out, I say!"),
    ("Othello", "O, beware, my lord, of jealousy;"), ("King Lear", "Blow, winds, and crack your cheeks!"),
    ("The Tempest", "We are such stuff as dreams are made on,"), ("Julius Caesar", "Et tu, Brute?"),
    ("Twelfth Night", "If music be the food of love, play on;"), ("Richard III", "A horse! a horse!"),
]]


def cut(tokens, eos):
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def exit_step(preds, span, patience, after):
    """First step n (1-based) at which the span's argmax has been unchanged for `patience` steps,
    not before a fraction `after` of the steps; the last step if never."""
    stable, N = 0, preds.size(0)
    for n in range(1, N):
        stable = stable + 1 if torch.equal(preds[n, span], preds[n - 1, span]) else 0
        if stable >= patience and n + 1 >= after * N:
            return n + 1
    return N


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--argmax", action="store_true", help="project by argmax instead of nucleus top-p 0.99")
    a = p.parse_args()
    torch.set_num_threads(1)
    path = os.path.join(sample.HERE, sample.DEFAULT_MODEL)
    model, tok = Transformer.from_pretrained(path, verbose=False).eval(), Tokenizer(path)
    gens = sample.generate(model, tok, PROMPTS[:a.prompts], steps=a.steps, batch_size=8, record=True,
                           top_p=None if a.argmax else 0.99)
    recorded = []
    for g in gens:
        start = (g.confidence[0] < 1).nonzero()[0].item()  # the first span position
        span = torch.zeros(g.predictions.size(1), dtype=torch.bool)
        span[start:] = True
        final = cut(g.predictions[-1, start:].tolist(), tok.eos_id)
        recorded.append((g.predictions, g.confidence, span, start, final))
    print(f"{len(gens)} prompts, {a.steps} steps, {'argmax' if a.argmax else 'nucleus top-p 0.99'}\n")
    print("| rule | steps used (mean) | steps saved | outputs identical to the full run |")
    print("| --- | --- | --- | --- |")
    for patience in (3, 5, 10, 20):
        for after in (0.0, 0.5, 0.6, 0.8):
            used, same = [], 0
            for preds, conf, span, start, final in recorded:
                n = exit_step(preds, span, patience, after)
                used.append(n)
                same += cut(preds[n - 1, start:].tolist(), tok.eos_id) == final
            mean = sum(used) / len(used)
            print(f"| unchanged for {patience} steps, not before {after:.0%} of them | {mean:.1f} | "
                  f"{1 - mean / a.steps:.0%} | {same}/{len(recorded)} |")


if __name__ == "__main__":
    main()
