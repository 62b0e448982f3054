"""
Wall time of sampling the shipped miniature with 1 thread and with all cores, interleaved in one
process (the machine is shared and noisy: compare within a run, report medians and the ratio).

    python bench/bench_threads.py [--steps 20] [--repeats 5]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
from model import Transformer  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    path = os.path.join(sample.HERE, sample.DEFAULT_MODEL)
    model, tok = Transformer.from_pretrained(path, verbose=False).eval(), Tokenizer(path)
    prompt = "Continue this speech by Brutus from Julius Caesar:\nRomans, countrymen, and lovers!"
    counts = sorted({1, os.cpu_count()})
    times = {n: [] for n in counts}
    for _ in range(a.repeats):
        for n in counts:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            sample.generate(model, tok, [prompt], steps=a.steps)
            times[n].append(time.perf_counter() - t0)
    print(f"| threads | median s ({a.steps} steps, {model.num_params() / 1e6:.1f}M parameters) | all runs |")
    print("| --- | --- | --- |")
    for n in counts:
        print(f"| {n} | {statistics.median(times[n]):.2f} | {', '.join(f'{x:.2f}' for x in times[n])} |")
    if len(counts) > 1:
        print(f"\nall cores / one thread: {statistics.median(times[counts[-1]]) / statistics.median(times[1]):.2f}x")


if __name__ == "__main__":
    main()
