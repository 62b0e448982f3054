"""
Watching the text form: sample.py's --show (the terminal) and --html (the paper's Figure 4: the
top-1 confidence of every position at every diffusion step, as a self-contained page).
Both are on_step callbacks of sample.run: (batch, state) after each step, where state (a
sample.Denoising) holds the rows of the batch still running (early exit takes rows out): their
keys (index in the batch), logits, argmax (best), lengths and steps taken.
"""
import html
import json
import os
import sys
import time

import torch

from support.cli import atomic_write


def confidence(logits):
    """Top-1 probability (B, L) of logits (B, L, V): exp(max - logsumexp), one row at a time to keep
    the temporaries small."""
    return torch.stack([(row.float().amax(-1) - row.float().logsumexp(-1)).exp() for row in logits])


def pieces(tokenizer, ids, cache=None):
    """The text of each token as it reads inside running text (decoded after an anchor token)."""
    cache = {} if cache is None else cache
    anchor = tokenizer.encode("a")[-1:]
    for i in set(ids) - cache.keys():
        cache[i] = tokenizer.decode(anchor + [i])[len(tokenizer.decode(anchor)):]
    return [cache[i] for i in ids]


class Recorder:
    """Keeps each row's argmax and top-1 confidence at every step, then attach() gives them to the
    Generations (predictions, confidence: (n, L), cut at the steps the row used). Calls `then` too."""

    def __init__(self, then=None):
        self.then, self.traces = then, []  # per batch, per row: [(best (L,), confidence (L,))] per step

    def __call__(self, batch, state):
        if max(state.taken) == 1:  # a new batch: every row is at its first step
            self.traces.append([[] for _ in batch.prompts])
        conf = torch.where(state.span_mask, confidence(state.logits), 1.0)  # (B, L): the prompt is 1
        for j, (b, n) in enumerate(zip(state.keys, state.lengths)):
            self.traces[-1][b].append((state.best[j, :n].cpu(), conf[j, :n].cpu()))
        if self.then is not None:
            self.then(batch, state)

    def attach(self, generations):
        for g, steps in zip(generations, (trace for batch in self.traces for trace in batch)):
            g.predictions, g.confidence = torch.stack([b for b, _ in steps]), torch.stack([c for _, c in steps])
        return generations


class Watcher:
    """--show redraws each row's current text (its argmax after the prompt, up to the first EOS) at
    each step; otherwise a progress line with steps/s once a run takes more than a second (both on
    stderr). On a terminal the text is redrawn in place and shaded by confidence."""

    def __init__(self, tokenizer, show):
        self.tok, self.show, self.eos = tokenizer, show, tokenizer.eos_id
        self.tty, self.t0, self.last, self.cache = sys.stderr.isatty(), time.perf_counter(), 0.0, {}

    def __call__(self, batch, state):
        n, steps, now = max(state.taken), max(state.steps), time.perf_counter() - self.t0
        rate = f"step {n}/{steps}, {n / max(now, 1e-9):.2f} steps/s"
        if self.show and (self.tty or n % max(1, steps // 10) == 0 or n == steps):
            print(("\x1b[H\x1b[2J" if self.tty else "") + f"[{rate}]\n" + "\n\n".join(self.texts(batch, state)),
                  file=sys.stderr, flush=True)
        elif not self.show and now > 1.0 and now - self.last > 0.5:
            self.last = now
            print(("\r" if self.tty else "") + rate, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def texts(self, batch, state):
        """Each running row's current text: its region after the prompt, cut at the first EOS."""
        conf, out = confidence(state.logits), []
        for j, (b, n) in enumerate(zip(state.keys, state.lengths)):
            start = batch.ends[b]  # each row's generation region begins at its prompt's end
            region = state.best[j, start:n].tolist()
            cut = region.index(self.eos) if self.eos in region else len(region)
            text = pieces(self.tok, region[:cut], self.cache)
            if self.tty:  # 256-colour greys: mid grey (unsure) to white (sure)
                text = [f"\x1b[38;5;{244 + round(11 * c)}m{p}" for p, c in zip(text, conf[j, start:].tolist())]
            out.append("".join(text) + ("\x1b[0m" if self.tty else ""))
        return out

    def end(self):
        """After a batch: end the progress line, restart the clock."""
        if self.last and not self.show and self.tty:
            print(file=sys.stderr)
        self.t0, self.last = time.perf_counter(), 0.0


def check_html_path(path):
    """--html PATH, checked before anything is sampled: a file can be written there."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--html {path}: cannot write a file there (is the folder missing or read-only?)")


def write_html(path, tokenizer, generations):
    """One self-contained page: for each prompt, a heatmap of the top-1 confidence at every step
    (one line per step, time flowing down) and position (columns; the prompt is 1), as in the paper's Figure 4,
    and the final text. Hover a cell for its token."""
    data, sections = [], []
    for k, g in enumerate(generations):
        preds = g.predictions.tolist()  # (n, L)
        used = sorted({x for row in preds for x in row})
        data.append(dict(conf=[[round(c, 3) for c in row] for row in g.confidence.tolist()], preds=preds,
                         pieces=dict(zip(map(str, used), pieces(tokenizer, used)))))
        sections.append(f'<section><h2>Prompt {k + 1} ({g.steps_used} steps, {g.seconds:.1f} s)</h2><pre>'
                        f'{html.escape(g.prompt)}</pre><canvas id="c{k}"></canvas><div class="tip" id="t{k}">&nbsp;'
                        f'</div><h3>Text</h3><pre>{html.escape(g.text)}</pre></section>')
    payload = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TESS 2 sample</title><style>body {{ font-family: sans-serif;
margin: 2em; }} canvas {{ image-rendering: pixelated; border: 1px solid #ccc; }} pre {{ white-space: pre-wrap;
background: #f6f6f6; padding: .5em; }} .tip {{ font-family: monospace; }}</style></head><body>
<h1>Confidence over diffusion steps</h1><p>Each heatmap row is a diffusion step (time flows down), each column a
position; darker means a higher top-1 probability. Prompt positions are 1, as in the paper's Figure 4.</p>
{"".join(sections)}
<script>
const DATA = {payload}, CELL = 6;
DATA.forEach((d, k) => {{
  const c = document.getElementById("c" + k), n = d.conf.length, L = d.conf[0].length, ctx = c.getContext("2d");
  c.width = L * CELL; c.height = n * CELL;  // resizing clears the canvas: set the size before drawing
  d.conf.forEach((row, s) => row.forEach((v, j) => {{
    ctx.fillStyle = `rgb(${{255 * (1 - v)}}, ${{255 * (1 - v)}}, 255)`; ctx.fillRect(j * CELL, s * CELL, CELL, CELL);
  }}));
  c.onmousemove = e => {{
    const j = Math.floor(e.offsetX / CELL), s = Math.floor(e.offsetY / CELL);
    if (s < n && j < L) document.getElementById("t" + k).textContent =
      `step ${{s + 1}}, position ${{j}}: ${{JSON.stringify(d.pieces[d.preds[s][j]])}} (p = ${{d.conf[s][j]}})`;
  }};
}});
</script></body></html>
"""
    atomic_write(path, page)
