"""
What the device check's sections share (bench/gpu.sh runs each bench/gpu_*.py in its own process):
the command line, the device, a report written as it goes, marks on the device's timeline, a time
budget, random models.

Each section writes, in the results folder OUT: NAME.md (its tables, flushed row by row, so that a
section stopped by its time limit keeps what it measured), NAME.json (its figures, for the other
sections and for reading back) and NAME.headline (one line for summary.md). A part that fails
writes its error where its row would be and the section goes on; the section then exits with 1.
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]
from model import Transformer  # noqa: E402

H100_BF16_TFLOPS = 989.0  # dense bf16, the datasheet figure train.py's --peak-tflops defaults to (H200: the same)


def parser(doc):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the results folder (bench/gpu.sh's OUTDIR)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks that the code runs")
    p.add_argument("--budget", type=float, default=60.0, help="seconds this section may take: parts that would "
                   "not fit are skipped (bench/gpu.sh gives its time limit less a margin)")
    return p


class Section:
    """One section's device, dtype, time budget and report."""

    def __init__(self, a, name, title):
        self.cuda = not a.cpu_smoke
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit(f"{name}: error: no CUDA device is visible to torch {torch.__version__}; "
                             "run with --cpu-smoke on a machine without one")
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.out, self.name, self.end = a.out, name, time.monotonic() + a.budget
        self.failed, self.skipped, self.figures = [], [], {}
        self.md = open(os.path.join(a.out, f"{name}.md"), "w")
        where = torch.cuda.get_device_name() if self.cuda else "CPU smoke run (tiny sizes: not a measurement)"
        self.write(f"## {title}\n\n{where}, torch {torch.__version__}\n")

    def left(self):
        return self.end - time.monotonic()

    def write(self, text=""):
        self.md.write(text + "\n")
        self.md.flush()

    def table(self, *header):
        self.write(f"\n| {' | '.join(header)} |\n|{' --- |' * len(header)}")

    def row(self, *cells):
        self.write("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")

    def record(self, **figures):
        """Adds figures to NAME.json (rewritten whole each time: it is small)."""
        self.figures.update(figures)
        path = os.path.join(self.out, f"{self.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.figures, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def part(self, label, f, needs=0.0):
        """Runs f(); an error becomes a line of the report and the section goes on. Skipped when fewer
        than `needs` seconds are left. Returns f's value, or None."""
        if self.left() < needs:
            self.skipped.append(label)
            self.write(f"\n(skipped: {label}: {self.left():.0f} s left, it needs about {needs:.0f} s)")
            return None
        try:
            return f()
        except Exception as e:  # one part's failure must not cost the others
            self.failed.append(label)
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            self.write(f"\n**error** in {label}: {type(e).__name__}: {msg}")
            traceback.print_exc()
            if self.cuda:
                torch.cuda.empty_cache()
            return None

    def headline(self, text):
        """NAME.headline: the section's result in one line, written as soon as there is one (a section
        stopped by its time limit keeps it)."""
        with open(os.path.join(self.out, f"{self.name}.headline"), "w") as f:
            f.write(text + "\n")

    def finish(self, headline):
        """Writes the final NAME.headline and exits: 1 if a part failed, else 0."""
        notes = [f"failed: {', '.join(self.failed)}"] if self.failed else []
        notes += [f"skipped for time: {', '.join(self.skipped)}"] if self.skipped else []
        self.headline("; ".join([headline] + notes))
        self.md.close()
        sys.exit(1 if self.failed else 0)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        """A point on the device's timeline: a recorded CUDA event, or the host clock on the CPU (where
        work is synchronous)."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end):
        if not self.cuda:
            return (end - start) * 1e3
        end.synchronize()
        return start.elapsed_time(end)

    def median_ms(self, f, reps, warmup=2):
        """Median milliseconds of f() over reps runs, each between two marks, after warm-up runs."""
        for _ in range(warmup):
            f()
        pairs = []
        for _ in range(reps):
            start = self.mark()
            f()
            pairs.append((start, self.mark()))
        return statistics.median(self.ms(s, e) for s, e in pairs)

    def peak_gb(self):
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def random_model(self, args, dtype=None, train=False):
        """A Transformer with random weights (model.init_weights), made on the device in dtype (default:
        the section's); for inference (eval, frozen) unless train."""
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype or self.dtype)
        try:
            with self.dev:
                net = Transformer(args).init_weights()
        finally:
            torch.set_default_dtype(old)
        return net if train else net.eval().requires_grad_(False)

    def ceiling_tflops(self):
        """Section (a)'s measured bf16 matrix-product rate, or None when it did not run."""
        try:
            with open(os.path.join(self.out, "a-device.json")) as f:
                return json.load(f).get("matmul_tflops")
        except (OSError, ValueError):
            return None
