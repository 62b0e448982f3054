"""
Less compute per answer on the shipped miniature: rows that shed their settled [PAD] tail
(sample.diffuse shed=M) and the deterministic sampler (sampler="ddim"), each against the dense
100-step run with the released stochastic sampler. Not a test: a measurement.

    python bench/bench_shed.py                                   # 16 prompts, rows of 256, ~15 min on 1 thread
    python bench/bench_shed.py --total-length 1024 --prompts 4 --trace-only

Prompts: "Continue this speech by ..." on the opening lines of speeches from the two plays held out
of the miniature's training (Julius Caesar, Twelfth Night), chat-templated, prompt j sampled with
seed j, batches of 8, nucleus top-p 0.99 (the released projection), rows of --total-length
positions: many times the miniature's answers (its own rows are 160). Sections:

  settling   in the dense run: where each row's trailing [PAD] starts at each step, and what shedding
             after M steps would cut: the share of the row, and whether the dense answer ends inside it
  shed M     at 100 steps, stochastic: M in --sweep
  steps      10, 25, 50, 100 steps, stochastic and ddim, dense and shed M = --shed (default: half the steps)
  noise      what a shed row's noise costs per step: the dense stream kept by drawing and discarding
             the shed positions' noise, or by skipping its words; other ways for comparison

Each configuration: model token-positions computed per answer (the batch's width times its rows, summed
over the model passes, over the answers), wall seconds for all prompts (sampling only), the share of
answers identical to the dense 100-step stochastic run (same seeds) and to the dense run at the same
steps and sampler, and, over all answers, perplexity under SmolLM2-135M-Instruct (the miniature's
held-out scorer: data/smollm2.py, as eval/miniature.py scores it), distinct-1/2 and the reward
model's mean score (models/tess2-shakespeare-rm).
"""
import argparse
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
import tess2  # noqa: E402
from eval.miniature import quality  # noqa: E402
from model import Transformer  # noqa: E402
from support import fused_sampling  # noqa: E402
from support.prompts import decode_row, plan, settings_for  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402

SPEECHES = [  # (speaker, play, opening lines): the miniature's held-out plays
    ("Brutus", "Julius Caesar", "Romans, countrymen, and lovers! hear me for my cause, and be silent, "
                                "that you may hear."),
    ("Antony", "Julius Caesar", "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, "
                                "not to praise him."),
    ("Cassius", "Julius Caesar", "Why, man, he doth bestride the narrow world\nLike a Colossus;"),
    ("Caesar", "Julius Caesar", "Cowards die many times before their deaths;\nThe valiant never taste of "
                                "death but once."),
    ("Flavius", "Julius Caesar", "Hence! home, you idle creatures, get you home:\nIs this a holiday?"),
    ("Marullus", "Julius Caesar", "Wherefore rejoice? What conquest brings he home?"),
    ("Calpurnia", "Julius Caesar", "When beggars die, there are no comets seen;\nThe heavens themselves "
                                   "blaze forth the death of princes."),
    ("Antony", "Julius Caesar", "O, pardon me, thou bleeding piece of earth,\nThat I am meek and gentle "
                                "with these butchers!"),
    ("Brutus", "Julius Caesar", "There is a tide in the affairs of men,\nWhich, taken at the flood, leads "
                                "on to fortune;"),
    ("Portia", "Julius Caesar", "Is Brutus sick, and is it physical\nTo walk unbraced and suck up the "
                                "humours\nOf the dank morning?"),
    ("Orsino", "Twelfth Night", "If music be the food of love, play on;\nGive me excess of it,"),
    ("Viola", "Twelfth Night", "What country, friends, is this?"),
    ("Viola", "Twelfth Night", "I left no ring with her: what means this lady?"),
    ("Clown", "Twelfth Night", "O mistress mine, where are you roaming?\nO, stay and hear; your true "
                               "love's coming,"),
    ("Sir Toby", "Twelfth Night", "Dost thou think, because thou art virtuous, there shall be no more "
                                  "cakes and ale?"),
    ("Olivia", "Twelfth Night", "What is your parentage?"),
]
PROMPTS = [f"Continue this speech by {who} from {play}:\n{lines}" for who, play, lines in SPEECHES]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--total-length", type=int, default=256, help="every row's length, prompt + region")
    p.add_argument("--shed", type=int, help="M for the steps table (default: half of each run's steps)")
    p.add_argument("--sweep", type=int, nargs="*", default=[1, 10, 30, 50], help="M for the shed M table")
    p.add_argument("--steps", type=int, nargs="*", default=[10, 25, 50, 100])
    p.add_argument("--trace-only", action="store_true", help="only the settling section (the dense 100-step run)")
    return p.parse_args()


class Bench:
    """The models, the batches and the dense reference; run() samples one configuration."""

    def __init__(self, a):
        here = os.path.join(sample.HERE, sample.DEFAULT_MODEL)
        self.model, self.tok = Transformer.from_pretrained(here, verbose=False).eval(), Tokenizer(here)
        s = settings_for(self.model.generation_config, self.model.args.max_length, total_length=a.total_length,
                         batch_size=8)
        self.prompts = PROMPTS[:a.prompts]
        self.batches = plan(self.tok, self.prompts, s, self.model.args)
        self.scorer, self.rm, self.done = None, None, {}

    def run(self, steps, sampler="stochastic", shed=None, on_step=None):
        """-> (generations, model positions computed per answer, wall seconds); each configuration once."""
        if (steps, sampler, shed) in self.done:
            return self.done[steps, sampler, shed]
        positions, real = [0], tess2.predict

        def counting(model, ids, *args, **kw):
            positions[0] += ids.numel()  # (B, width): what the model computes this pass
            return real(model, ids, *args, **kw)
        tess2.predict, gens, t0 = counting, [], time.perf_counter()
        try:
            for b in self.batches:
                tokens, _ = sample.diffuse(self.model, b.ids, b.span_mask, b.seeds, steps, 0.99, sampler=sampler,
                                           shed=shed, pad_id=self.tok.pad_id, on_step=on_step)
                gens += [decode_row(self.tok, b.prompts[r], tokens[r, :n].tolist(), b.span_mask[r, :n].tolist(),
                                    b.ends[r]) for r, n in enumerate(b.lengths)]
        finally:
            tess2.predict = real
        self.done[steps, sampler, shed] = gens, positions[0] / len(gens), time.perf_counter() - t0
        return self.done[steps, sampler, shed]

    def quality(self, gens):
        if self.scorer is None:
            from data.smollm2 import ensure
            path = str(ensure())
            self.scorer = (Transformer.from_pretrained(path, verbose=False).eval(), Tokenizer(path))
            rm = os.path.join(sample.HERE, sample.DEFAULT_REWARD_MODEL)
            self.rm = Transformer.from_pretrained(rm, verbose=False).eval()
        answers = [types.SimpleNamespace(text=g.text, tokens=g.tokens) for g in gens]
        return quality(answers, [{"user": p} for p in self.prompts], self.tok, self.scorer, self.rm)


def settling(bench, total_length):
    """The dense 100-step run, traced: each row's trailing [PAD] start at each step -> its generations."""
    starts = []  # per batch: (steps, B) the first position of each row's trailing [PAD]

    def trace(state):
        if state.taken[0] == 1:
            starts.append([])
        real = torch.arange(state.ids.shape[1]) < torch.tensor(state.lengths)[:, None]
        tail = fused_sampling.trailing_pad(state.best, state.span_mask, real, [bench.tok.pad_id] * len(state.keys))
        starts[-1].append((torch.tensor(state.lengths) - tail.sum(-1)).tolist())
    gens, positions, seconds = bench.run(100, on_step=trace)
    rows = [(b, r) for b, batch in enumerate(bench.batches) for r in range(len(batch.prompts))]
    per_row = [torch.tensor(starts[b])[:, r] for b, r in rows]  # (100,) each
    ends = [bench.batches[b].ends[r] for b, r in rows]
    final = [int(x[-1]) for x in per_row]
    after = [f - e for f, e in zip(final, ends)]  # the answer, its EOS and any [PAD] inside it
    moves = sorted(last_move(x) for x in per_row)
    words = sum(len(g.text.split()) for g in gens) / len(gens)
    print(f"\n### When the [PAD] tails settle (dense, 100 steps, rows of {total_length})\n")
    print(f"{len(gens)} rows; prompt ends at {min(ends)}-{max(ends)}; the final trailing [PAD] starts "
          f"{min(after)}-{max(after)} positions after the prompt (the answer, its EOS and any [PAD] inside it). "
          f"Its start at step 1 is within {max(abs(int(x[0]) - f) for x, f in zip(per_row, final))} positions of "
          f"the final one; the last step at which it moves: median {moves[len(moves) // 2]}, max {moves[-1]}. "
          f"Mean answer: {words:.1f} words; the first two: {' | '.join(repr(g.text) for g in gens[:2])}.\n")
    print("| M | shed at step M: share of the row | rows whose final answer reaches into what is shed |")
    print("| --- | --- | --- |")
    for M in (1, 2, 3, 5, 10, 20, 30, 50):
        cut = [int(x[:M].max()) for x in per_row]  # PAD in each of steps 1..M: the positions shed at step M
        share = sum(total_length - c for c in cut) / (total_length * len(cut))
        print(f"| {M} | {share:.1%} | {sum(f > c for f, c in zip(final, cut))}/{len(cut)} |")
    return (gens, positions, seconds), sorted(after)[len(after) // 2]


def last_move(starts):
    moved = (starts[1:] != starts[:-1]).nonzero()
    return int(moved[-1]) + 2 if len(moved) else 1


SAMPLES = {}  # label -> the first two answers


def row(label, bench, gens, positions, seconds, reference, dense=None):
    """One table line: cost against the reference, agreement, quality."""
    ref_gens, ref_positions, ref_seconds = reference
    SAMPLES[label] = [g.text for g in gens[:2]]
    same = sum(g.text == r.text for g, r in zip(gens, ref_gens))
    same_dense = "" if dense is None else f"{sum(g.text == r.text for g, r in zip(gens, dense))}/{len(gens)}"
    q = bench.quality(gens)
    return (f"| {label} | {positions:.0f} ({positions / ref_positions:.0%}) | {seconds:.1f} "
            f"({seconds / ref_seconds:.0%}) | {same}/{len(gens)} | {same_dense} | {q['perplexity']:.0f} | "
            f"{q['distinct_1']:.3f} | {q['distinct_2']:.3f} | {q['reward']:.3f} | {q['mean_words']:.1f} |")


HEADER = ("| {} | positions per answer (of dense 100) | seconds (of dense 100) | = dense 100 | = dense, same steps "
          "and sampler | perplexity | distinct-1 | distinct-2 | reward | words |\n" + "| --- " * 10 + "|")


def noise_cost(n_total, n_kept, V, repeats=20):
    """Milliseconds per step for one row's re-noising noise (n_kept of n_total span positions kept)."""
    x, g = torch.empty(n_kept, V), torch.Generator().manual_seed(0)
    ways = {
        "dense row: all n positions drawn (no shedding)": lambda: torch.empty(n_total, V).normal_(generator=g),
        "kept positions only (not the dense stream)": lambda: x.normal_(generator=g),
        "kept + the rest drawn and discarded (normal_prefix_ off the CPU)":
            lambda: x.copy_(torch.empty(n_total, V).normal_(generator=g)[:n_kept]),
        "kept + the rest's words skipped (normal_prefix_ on the CPU)":
            lambda: fused_sampling._normal_prefix_cpu_(x, n_total, g),
        "a generator per kept position, seeded per (row, step, position) (not the dense stream)":
            lambda: [x[j].normal_(generator=torch.Generator().manual_seed(1000 * j + 7)) for j in range(n_kept)],
    }
    print(f"\n### A shed row's noise per step: {n_kept} of {n_total} span positions kept, V = {V} (median of "
          f"{repeats})\n\n| noise | ms per step |\n| --- | --- |")
    for name, f in ways.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {1000 * sorted(times)[repeats // 2]:.2f} |")


def main():
    a = parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bench = Bench(a)
    print(f"bench/bench_shed.py: {len(bench.prompts)} prompts, rows of {a.total_length}, nucleus top-p 0.99, "
          f"batches of 8, torch {torch.__version__}, {torch.get_num_threads()} thread")
    reference, answer = settling(bench, a.total_length)
    if a.trace_only:
        return
    print(f"\nDense 100 steps, stochastic: {reference[1]:.0f} positions per answer, {reference[2]:.1f} s.")
    print(f"\n### Shedding after M settled steps (100 steps, stochastic)\n\n{HEADER.format('M')}")
    print(row("dense", bench, *reference, reference))
    for M in a.sweep:
        print(row(str(M), bench, *bench.run(100, shed=M), reference, reference[0]), flush=True)
    print(f"\n### Steps and samplers, dense and shed M = {a.shed or 'half of the steps'}\n\n"
          f"{HEADER.format('steps, sampler, shed')}")
    for sampler in ("stochastic", "ddim"):
        for n in a.steps:
            dense, M = bench.run(n, sampler), a.shed or n // 2
            print(row(f"{n}, {sampler}, dense", bench, *dense, reference), flush=True)
            print(row(f"{n}, {sampler}, shed {M}", bench, *bench.run(n, sampler, M), reference, dense[0]), flush=True)
    ends = [e for b in bench.batches for e in b.ends]
    noise_cost(a.total_length - sum(ends) // len(ends), answer, bench.model.args.vocab_size)
    print("\n### The first two answers\n")
    for label, texts in SAMPLES.items():
        print(f"- {label}: " + " | ".join(repr(t) for t in texts))
    print(f"\n({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
