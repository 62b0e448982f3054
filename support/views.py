"""
Watching the text form: sample.py's --show (the terminal) and --html (the paper's Figure 4: the
top-1 confidence of every position at every diffusion step, as a self-contained page).
Both are on_step callbacks of sample.run: (batch, n, logits, best, rows) after each step, for the
rows of the batch still running (early exit takes rows out).
"""
import html
import json
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

    def __call__(self, batch, n, logits, best, rows):
        if n == 1:
            self.traces.append([[] for _ in batch.prompts])
        conf = torch.where(batch.span_mask[rows].to(best.device), confidence(logits), 1.0)  # the prompt is 1
        for j, r in enumerate(rows):
            self.traces[-1][r].append((best[j, :batch.lengths[r]].cpu(), conf[j, :batch.lengths[r]].cpu()))
        if self.then is not None:
            self.then(batch, n, logits, best, rows)

    def attach(self, generations):
        for g, steps in zip(generations, (row for trace in self.traces for row in trace)):
            g.predictions, g.confidence = torch.stack([b for b, _ in steps]), torch.stack([c for _, c in steps])
        return generations


class Watcher:
    """--show redraws the current best text each step; otherwise a progress line with steps/s once
    a run takes more than a second (both on stderr)."""

    def __init__(self, tokenizer, steps, show):
        self.tok, self.steps, self.show, self.eos = tokenizer, steps, show, tokenizer.eos_id
        self.tty, self.t0, self.last, self.cache = sys.stderr.isatty(), time.perf_counter(), 0.0, {}

    def __call__(self, batch, n, logits, best, rows):
        now = time.perf_counter() - self.t0
        rate = f"step {n}/{self.steps}, {n / max(now, 1e-9):.2f} steps/s"
        if self.show and (self.tty or n % max(1, self.steps // 10) == 0 or n == self.steps):
            conf = confidence(logits)
            rows = []
            for b, r in enumerate(rows):  # each row's generation region begins at its prompt's end
                start = batch.ends[r]
                region = best[b, start:batch.lengths[r]].tolist()
                cut = region.index(self.eos) if self.eos in region else len(region)
                text = pieces(self.tok, region[:cut], self.cache)
                if self.tty:  # 256-colour greys: mid grey (unsure) to white (sure)
                    text = [f"\x1b[38;5;{244 + round(11 * c)}m{p}" for p, c in zip(text, conf[b, start:].tolist())]
                rows.append("".join(text) + ("\x1b[0m" if self.tty else ""))
            clear = "\x1b[H\x1b[2J" if self.tty else ""
            print(f"{clear}[{rate}]\n" + "\n\n".join(rows), file=sys.stderr, flush=True)
        elif not self.show and now > 1.0 and now - self.last > 0.5:
            self.last = now
            print(("\r" if self.tty else "") + rate, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def end(self):
        """After a batch: end the progress line, restart the clock."""
        if self.last and not self.show and self.tty:
            print(file=sys.stderr)
        self.t0, self.last = time.perf_counter(), 0.0


def write_html(path, tokenizer, generations):
    """One self-contained page: for each prompt, a heatmap of the top-1 confidence at every step
    (rows, time flowing down) and position (columns; the prompt is 1), as in the paper's Figure 4,
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
