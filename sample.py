"""
Sample from a TESS 2 simplex diffusion model: the reverse process of SPEC.md section 9 (paper
Eq. 4-5, Fig. 1) with reward guidance (section 10, paper Sec. 3.4), infilling, early exit and two
ways to watch the text form (--show, --html).

    python sample.py --prompt "Write a sonnet about the sea."   # models/tess2-shakespeare
    python sample.py --model hamishivi/tess2 --prompt "..." --reward-model hamishivi/tess_mistral_rm
    python sample.py --no-chat --argmax --prompt "The <mask:3> sat on the <mask:2>."

A row is BOS + the prompt (context: clean tokens that never change) + a generation region (span)
that starts as pure noise. Prompt j of a run is sampled with seed + j from its own generators, so
its text does not depend on what else is in its batch, given the same row length.
"""
import argparse
import html
import json
import os
import re
import sys
import time
import types
from dataclasses import dataclass

import torch

import data.chat
import tess2
from model import ModelArgs, Tokenizer, Transformer, resolve

HERE = os.path.dirname(os.path.abspath(__file__))  # the default checkpoints are found from here
DEFAULT_MODEL = "models/tess2-shakespeare"
DEFAULT_REWARD_MODEL = "models/tess2-shakespeare-rm"  # with --eta and no --reward-model
GAP = re.compile(r"<mask:(\d+)>")


# -----------------------------------------------------------------------------
# Rows: prompt -> context ids and span mask


def encode_prompt(tokenizer, prompt: str, chat: bool = True):
    """One prompt -> (ids, span) lists: BOS + the prompt, stripped and in the Tulu chat template
    "<|user|>\\n{prompt}\\n<|assistant|>\\n" as in training (SPEC 8) unless chat=False. `<mask:N>`
    marks a gap of N span positions; such a prompt is used as written, never templated (write the
    template out to infill an answer), and spaces next to a gap go: generated tokens carry their own."""
    parts = GAP.split(prompt)  # text, N, text, N, ..., text
    if len(parts) == 1:
        ids = data.chat.encode_prompt(tokenizer, prompt) if chat else [tokenizer.bos_id] + tokenizer.encode(prompt)
        return ids, [False] * len(ids)
    placeholder = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id  # never read
    ids, span = [tokenizer.bos_id], [False]
    for j, part in enumerate(parts):
        if j % 2:  # a gap
            if int(part) < 1:
                raise ValueError(f"<mask:{part}> in prompt {prompt!r}: a gap needs at least one token")
            piece, gap = [placeholder] * int(part), True
        else:
            text = part.lstrip() if j > 0 else part
            text = text.rstrip() if j < len(parts) - 1 else text
            piece, gap = tokenizer.encode(text) if text else [], False
        ids += piece
        span += [gap] * len(piece)
    return ids, span



def make_batch(tokenizer, prompts, length=None, total_length=None, chat=True, max_len=None):
    """Prompts -> ids (B, L), span_mask (B, L) bool, ends [B] (where each prompt ends and its
    generation region begins). The rows share one length L = total_length or the longest prompt +
    its `length` (default 256, or 0 for a prompt with gaps or when total_length is given), so no
    attention mask is needed: a shorter prompt gets a longer region, which the model learned to
    end with EOS and fill up with [PAD]."""
    rows = [encode_prompt(tokenizer, p, chat) for p in prompts]
    default = lambda span: 0 if any(span) or total_length else 256  # noqa: E731
    want = [len(ids) + (default(span) if length is None else length) for ids, span in rows]
    L = total_length or max(want)
    for j, (p, (ids, span), w) in enumerate(zip(prompts, rows, want)):
        if w > L:
            raise ValueError(f"prompt {j} needs {w} positions ({len(ids)} prompt + {w - len(ids)} to generate) "
                             f"but --total-length is {L}: raise it or lower --length")
        if L == len(ids) and not any(span):
            raise ValueError(f"prompt {j} leaves nothing to generate: pass --length > 0 or put <mask:N> gaps in it")
    if max_len is not None and L > max_len:
        raise ValueError(f"rows of {L} positions (longest prompt {max(len(r) for r, _ in rows)} + generation) but "
                         f"the model reads at most {max_len}: shorten the prompt or lower --length / --total-length")
    fill = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    ids = torch.tensor([r + [fill] * (L - len(r)) for r, _ in rows])  # (B, L)
    span_mask = torch.tensor([s + [True] * (L - len(s)) for _, s in rows])  # (B, L)
    return ids, span_mask, [len(r) for r, _ in rows]


def max_length(args: ModelArgs) -> int:
    return min(args.max_position_embeddings, args.sliding_window or args.max_position_embeddings)


# -----------------------------------------------------------------------------
# The reverse process (SPEC 9) and reward guidance (SPEC 10)


def reward_guidance(rm, logits, ids, span_mask, eta, steps=5, tau=1.0):
    """Sec. 3.4, Eq. 9-11: `steps` rounds of x <- x + eta * grad_x R(x) on the logits x (B, L, V).
    The reward model reads softmax(x / tau) @ E_rm at span positions and E_rm[token] (= one-hot
    @ E_rm) at context positions, causally, and scores the last position. Computed in the
    reward model's dtype (the released code: bf16; on CPU use fp32). Rows are independent:
    their rewards are summed only to get every row's gradient from one backward pass."""
    E = rm.embed_tokens.weight  # (V, D_rm)
    context = rm.embed_tokens(ids)  # (B, L, D_rm)
    x = logits.detach().to(E.dtype)  # (B, L, V), updated in place
    for _ in range(steps):
        with torch.enable_grad():
            x.requires_grad_(True)
            p = torch.softmax(x if tau == 1.0 else x / tau, dim=-1)  # (B, L, V)
            h = torch.where(span_mask.unsqueeze(-1), p @ E, context)  # (B, L, D_rm)
            reward = rm(embeds=h, causal=True)  # (B,)
            (grad,) = torch.autograd.grad(reward.sum(), x)  # (B, L, V), zero at context positions
        x = x.detach().add_(grad, alpha=eta)
        del p, h, grad
    return x.to(logits.dtype)


def nucleus(logits, chunks, top_p, generators, size=64):
    """Eq. 5 by nucleus sampling (tess2.project) on the (row b, positions s..s+size) chunks holding span
    positions, from generators[b]; chunks keep the sort's (positions, V) temporaries small.
    logits (B, L, V) -> tokens (B, L), -1 outside the chunks."""
    out = torch.full(logits.shape[:2], -1, dtype=torch.long, device=logits.device)
    for b, s in chunks:
        out[b, s:s + size] = tess2.project(logits[b, s:s + size].unsqueeze(0), top_p, generators[b])[0]
    return out


def confidence(logits):
    """Top-1 probability (B, L) of logits (B, L, V), one row at a time to keep temporaries small."""
    return torch.stack([(l.float().amax(-1) - l.float().logsumexp(-1)).exp() for l in logits])


@torch.no_grad()
def diffuse(model, ids, span_mask, seeds, steps=100, top_p=0.99, guide=None, early_exit=None,
            record=False, on_step=None, predict=tess2.predict):
    """The reverse process on one batch. ids (B, L) context tokens (span positions are ignored),
    span_mask (B, L), seeds: one int per row, whose generator draws all its noise and nucleus
    samples. top_p None projects by argmax (paper Eq. 5), else by nucleus sampling (released
    default 0.99). guide: logits -> logits (reward guidance). early_exit N: a row stops once the
    argmax of its span has not changed for N steps in a row; its output is its projection then.
    Returns tokens (B, L), steps_used (B,) and, if record, the argmax tokens and their top-1
    confidence at every step, both (n, B, L).

    Memory, in (B, L, V) fp32 tensors (128 KB per position at V = 32001): the loop holds two, the
    noisy simplex S (each step's noise is drawn into it and turned into S in place; predict also
    uses it as scratch) and the logits (the next step's self-conditioning input). predict makes the
    new logits before the previous ones go: 3 at the peak. Nucleus sampling and confidence work a
    few positions at a time. Reward guidance peaks at 5 (its softmax and two gradients). The
    released loop holds about 10 (bench/bench_sample.py measures 3.1, 5.4 and 9.9)."""
    B, L = ids.shape
    V, N, dev = model.args.vocab_size, steps, ids.device
    generators = tess2.row_generators(seeds, dev)
    alpha_bars = tess2.alpha_bars(N).to(dev)  # (N,): alpha_bar(i / N)
    S = tess2.row_noise_(torch.empty(B, L, V, device=dev), generators).mul_(tess2.SIMPLEX_VALUE)  # k * N(0, I)
    logits, tokens, last_best = None, ids.clone(), None  # logits None: uniform self-conditioning
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    stable = torch.zeros(B, dtype=torch.long, device=dev)
    steps_used = torch.full((B,), N, dtype=torch.long)
    chunks = [(b, s) for b, row in enumerate(span_mask.tolist()) for s in range(0, L, 64) if any(row[s:s + 64])]
    trace = ([], [])
    for n, i in enumerate(range(N - 1, -1, -1)):
        t = torch.full((B,), i / N, device=dev)  # scaled time i / N, per row
        logits = predict(model, ids, span_mask, S, t, logits, inplace=True)  # (B, L, V); S is scratch now
        if guide is not None:
            logits = guide(logits)  # guided logits feed the projection and the next self-conditioning
        best = torch.where(span_mask, logits.argmax(-1), ids)  # (B, L)
        new = best if top_p is None else torch.where(span_mask, nucleus(logits, chunks, top_p, generators), ids)
        tokens = torch.where(done.unsqueeze(-1), tokens, new)  # rows that exited keep their output
        if record:
            trace[0].append(best.cpu())
            trace[1].append(torch.where(span_mask, confidence(logits), 1.0).cpu())
        if on_step is not None:
            on_step(n + 1, logits, best)
        if early_exit:
            same = (best == last_best).all(-1) if last_best is not None else torch.zeros_like(done)
            stable = torch.where(same, stable + 1, 0)
            newly = ~done & (stable >= early_exit)
            steps_used[newly.cpu()] = n + 1
            done |= newly
            if bool(done.all()):
                break
        last_best = best
        if i > 0:  # S_{i-1} = sqrt(alpha_bar_{i-1}) S_hat + sqrt(1 - alpha_bar_{i-1}) k eps (alpha_bar_{-1} = 1: none)
            tess2.renoise(tokens, tess2.row_noise_(S, generators), alpha_bars[i - 1].expand(B), inplace=True)
    return tokens, steps_used, (torch.stack(trace[0]), torch.stack(trace[1])) if record else None


def check_settings(steps, length, total_length, batch_size, guidance_steps, early_exit, top_p):
    """The numbers generate() and the command line take, refused with the flag to fix."""
    for flag, value, low in (("steps", steps, 1), ("length", length, 0), ("total-length", total_length, 1),
                             ("batch-size", batch_size, 1), ("guidance-steps", guidance_steps, 1),
                             ("early-exit", early_exit, 1)):
        if value is not None and value < low:
            raise ValueError(f"--{flag} must be at least {low}, got {value}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p} (for argmax: --argmax, top_p=None)")


def check_reward_model(model, tokenizer, reward_model, reward_tokenizer=None):
    """Model and reward model must share a tokenizer (SPEC 10): same vocabulary and special ids."""
    if getattr(reward_model.args, "head", "score") != "score":
        raise ValueError("the reward model must have a score head (a ...ForSequenceClassification checkpoint)")
    if reward_model.args.vocab_size != model.args.vocab_size:
        raise ValueError(f"the reward model has a vocabulary of {reward_model.args.vocab_size} and the diffusion "
                         f"model {model.args.vocab_size}: reward guidance needs both to share one tokenizer")
    if reward_tokenizer is not None and reward_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"the tokenizers differ: model {tokenizer.fingerprint()}, reward model "
                         f"{reward_tokenizer.fingerprint()}; reward guidance needs both to share one tokenizer")


# -----------------------------------------------------------------------------
# generate: prompts in, texts out


@dataclass
class Generation:
    prompt: str
    text: str  # the generated text; for a prompt with gaps, the whole document filled in
    tokens: list  # generated ids: the gaps, then the region cut at the first EOS, [PAD] dropped
    steps_used: int
    seconds: float  # wall time of its batch
    predictions: torch.Tensor | None = None  # (n, L) argmax token at each step (prompt: itself)
    confidence: torch.Tensor | None = None  # (n, L) top-1 probability at each step (prompt: 1)


def generate(model, tokenizer, prompts, steps=100, length=None, total_length=None, top_p=0.99, seed=0,
             batch_size=8, chat=True, reward_model=None, reward_tokenizer=None, eta=None, guidance_steps=5,
             tau=1.0, early_exit=None, details=False, record=False, on_step=None, predict=tess2.predict):
    """Generate a response for each prompt (a str or list of str) -> list[str]; with details=True
    (or record=True) a list of Generation: text, tokens, steps used, seconds and, if record,
    the per-step predictions and confidences. Prompt j is sampled with seed + j. make_batch says
    what length and total_length mean, encode_prompt how `<mask:N>` gaps infill."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_settings(steps, length, total_length, batch_size, guidance_steps, early_exit, top_p)
    if eta and reward_model is None:
        raise ValueError(f"eta = {eta} needs a reward model: pass reward_model (--reward-model)")
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.args.vocab_size}: they do not belong together")
    guide = None
    if reward_model is not None:
        check_reward_model(model, tokenizer, reward_model, reward_tokenizer)
        eta = 0.25 if eta is None else eta  # the paper's best for TESS 2 v0.1 (Table 3a)
    dev = model.embed_tokens.weight.device
    batches = [prompts[s:s + batch_size] for s in range(0, len(prompts), batch_size)]
    planned = [make_batch(tokenizer, b, length, total_length, chat, max_length(model.args)) for b in batches]
    out = []
    for start, batch, (ids, span_mask, ends) in zip(range(0, len(prompts), batch_size), batches, planned):
        ids, span_mask = ids.to(dev), span_mask.to(dev)
        if reward_model is not None and eta:
            guide = lambda x: reward_guidance(reward_model, x, ids, span_mask, eta, guidance_steps, tau)  # noqa: E731
        t0 = time.perf_counter()
        tokens, steps_used, trace = diffuse(model, ids, span_mask, range(seed + start, seed + start + len(batch)),
                                            steps, top_p, guide, early_exit, record, on_step, predict)
        seconds = time.perf_counter() - t0
        for b, prompt in enumerate(batch):
            g = decode_row(tokenizer, prompt, tokens[b].tolist(), span_mask[b].tolist(), ends[b])
            g.steps_used, g.seconds = int(steps_used[b]), seconds
            if trace is not None:
                g.predictions, g.confidence = trace[0][:g.steps_used, b], trace[1][:g.steps_used, b]
            out.append(g)
    return out if details or record else [g.text for g in out]


def decode_row(tokenizer, prompt, row, span, end):
    """A sampled row -> Generation: the region after the prompt is cut at its first EOS, [PAD] dropped."""
    tail = row[end:]
    if tokenizer.eos_id in tail:
        tail = tail[:tail.index(tokenizer.eos_id)]
    tail = [x for x in tail if x != tokenizer.pad_id]
    gaps = [x for x, s in zip(row[:end], span[:end]) if s]
    if not gaps:
        return Generation(prompt, tokenizer.decode(tail), tail, 0, 0.0)
    specials = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    doc = [x for x, s in zip(row[1:end], span[1:end]) if not (s and x in specials)]  # the prompt, gaps filled
    return Generation(prompt, tokenizer.decode(doc + tail), gaps + tail, 0, 0.0)


# -----------------------------------------------------------------------------
# Watching: --show (terminal), --html (Figure 4 of the paper), a progress line


def pieces(tokenizer, ids, cache=None):
    """The text of each token as it reads inside running text (decoded after an anchor token)."""
    cache = {} if cache is None else cache
    anchor = tokenizer.encode("a")[-1:]
    for i in set(ids) - cache.keys():
        cache[i] = tokenizer.decode(anchor + [i])[len(tokenizer.decode(anchor)):]
    return [cache[i] for i in ids]


class Watcher:
    """The on_step callback of the CLI: --show redraws the current best text each step; otherwise a
    progress line with steps/s once a run takes more than a second (both on stderr)."""

    def __init__(self, tokenizer, steps, show, span_mask):
        self.tok, self.steps, self.show, self.eos = tokenizer, steps, show, tokenizer.eos_id
        self.starts = span_mask.int().argmax(1).tolist()  # each row's first span position
        self.tty, self.t0, self.last, self.cache = sys.stderr.isatty(), time.perf_counter(), 0.0, {}

    def __call__(self, n, logits, best):
        now = time.perf_counter() - self.t0
        rate = f"step {n}/{self.steps}, {n / max(now, 1e-9):.2f} steps/s"
        if self.show and (self.tty or n % max(1, self.steps // 10) == 0 or n == self.steps):
            conf = confidence(logits)
            rows = []
            for b, start in enumerate(self.starts):
                region = best[b, start:].tolist()
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
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


# -----------------------------------------------------------------------------
# Command line


def read_prompts(path):
    """One prompt per line; in a .jsonl file, a JSON string or {"prompt": ...} per line."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not path.endswith(".jsonl"):
        return lines
    return [o if isinstance(o, str) else o["prompt"] for o in map(json.loads, lines)]


def read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return ModelArgs.from_hf(json.load(f))


def checkpoint_dir(name, flag, parser, default):
    """A local directory, or a Hub id (owner/name) fetched by model.resolve. The default is a
    directory of this repository, found from this file wherever the command runs; it must exist."""
    path = os.path.join(HERE, name) if name == default else name
    if os.path.isdir(path) or (name != default and name.count("/") == 1 and not name.startswith((".", "/", "~"))):
        return resolve(path)
    hint = f" (the default {flag})" if name == default else ""
    parser.error(f"no checkpoint directory {path!r}{hint}: pass {flag} DIR, a directory holding config.json, "
                 "model.safetensors and tokenizer.json (or a Hub id such as hamishivi/tess2)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Infilling: write <mask:N> in a "
                                "prompt for a gap of N tokens; the prompt is then used as written (no chat template).")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"diffusion model: checkpoint directory or Hub id "
                   f"(default: {DEFAULT_MODEL} of this repository)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several); <mask:N> marks a gap")
    p.add_argument("--prompts-file", help="one prompt per line (.jsonl: a JSON string or {\"prompt\": ...} per line)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the Tulu chat template")
    p.add_argument("--steps", type=int, default=100, help="diffusion steps N")
    p.add_argument("--length", type=int, help="positions to generate after each prompt (default 256; 0 with gaps)")
    p.add_argument("--total-length", type=int, help="fixed row length L for every batch (prompt + region)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-p", type=float, default=0.99, help="nucleus sampling projection (released default)")
    g.add_argument("--argmax", action="store_true", help="argmax projection (paper Eq. 5)")
    p.add_argument("--reward-model", help="reward model for guidance: checkpoint directory or Hub id")
    p.add_argument("--eta", type=float, help=f"guidance step size (default 0.25 with --reward-model; without one, "
                   f"guides with {DEFAULT_REWARD_MODEL} of this repository)")
    p.add_argument("--guidance-steps", type=int, default=5, help="gradient-ascent steps per diffusion step")
    p.add_argument("--tau", type=float, default=1.0, help="softmax temperature of the reward model's input")
    p.add_argument("--early-exit", type=int, help="stop a row once its argmax is unchanged for this many steps")
    p.add_argument("--seed", type=int, default=0, help="prompt j is sampled with seed + j")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and logits (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the predict step")
    p.add_argument("--show", action="store_true", help="redraw the current text each step on stderr, shaded by confidence")
    p.add_argument("--html", help="write a page with the confidence of every position at every step")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    a = p.parse_args(argv)
    top_p, chat = None if a.argmax else a.top_p, not a.no_chat
    prompts = (a.prompt or []) + (read_prompts(a.prompts_file) if a.prompts_file else [])
    try:  # bad input fails here, before any weights load
        check_settings(a.steps, a.length, a.total_length, a.batch_size, a.guidance_steps, a.early_exit, top_p)
        if not prompts:
            raise ValueError("no prompt: pass --prompt TEXT or --prompts-file FILE")
        path = checkpoint_dir(a.model, "--model", p, DEFAULT_MODEL)
        rm_name = a.reward_model or (DEFAULT_REWARD_MODEL if a.eta else None)  # --eta alone: the default
        rm_path = checkpoint_dir(rm_name, "--reward-model", p, DEFAULT_REWARD_MODEL) if rm_name else None
        tok, cfg = Tokenizer(path), read_config(path)
        batches = [prompts[s:s + a.batch_size] for s in range(0, len(prompts), a.batch_size)]
        spans = [make_batch(tok, b, a.length, a.total_length, chat, max_length(cfg))[1] for b in batches]
        rm_tok = Tokenizer(rm_path) if rm_path else None
        if rm_path:
            check_reward_model(types.SimpleNamespace(args=cfg), tok, types.SimpleNamespace(args=read_config(rm_path)),
                               rm_tok)
    except ValueError as e:
        p.error(str(e))
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    load = lambda d: Transformer.from_pretrained(d, dtype=dtype, device=a.device, verbose=False).eval()  # noqa: E731
    model, rm = load(path), load(rm_path) if rm_path else None
    predict = torch.compile(tess2.predict) if a.compile else tess2.predict
    out = []
    for s, batch, span_mask in zip(range(0, len(prompts), a.batch_size), batches, spans):
        watch = Watcher(tok, a.steps, a.show, span_mask)  # batch by batch, so the watcher knows the rows
        gens = generate(model, tok, batch, a.steps, a.length, a.total_length, top_p, a.seed + s, a.batch_size, chat,
                        rm, rm_tok, a.eta, a.guidance_steps, a.tau, a.early_exit, details=True, record=bool(a.html),
                        on_step=watch, predict=predict)
        if watch.last and not a.show and watch.tty:
            print(file=sys.stderr)
        for g in gens:
            print(json.dumps(dict(prompt=g.prompt, text=g.text, tokens=g.tokens, steps_used=g.steps_used,
                                  seconds=round(g.seconds, 3))) if a.json else g.text + "\n" * (len(prompts) > 1),
                  flush=True)
        out += gens
    if a.html:
        write_html(a.html, tok, out)
    return out


if __name__ == "__main__":
    main()
