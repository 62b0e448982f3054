"""
Prompts in, texts out: how prompts become the rows that sample.py's reverse process fills, and rows
become text (METHOD.md §9), with the one home of the generation settings (Settings): the
checkpoint's generation_config.json, else the released evaluation's, then what a caller or a flag
gives.

A row is BOS + the prompt in the Tulu chat template (context: clean tokens that never change) +
a generation region (span). `<mask:N>` in a prompt is a gap of N span positions (infilling).
"""
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import torch

import data.chat
from model import ModelArgs

GAP = re.compile(r"<mask:([^>]*)>")


# -----------------------------------------------------------------------------
# Settings: the checkpoint's generation_config.json, else the released evaluation's; then overrides

GUIDANCE_ETA = 0.25  # eta when a reward model is given and eta is not: the paper's best for TESS 2 v0.1 (Table 3a)


@dataclass
class Settings:
    steps: int = 100  # N
    top_p: float | None = 0.99  # nucleus projection (released evaluation); None: argmax (paper Eq. 5)
    total_length: int | None = 2048  # every row's length, prompt + region (released evaluation: 2048)
    length: int | None = None  # or: positions to generate after each prompt (rows then differ in length)
    seed: int = 0  # prompt j is sampled with seed + j
    batch_size: int = 8
    chat: bool = True  # wrap prompts in the Tulu chat template (§8)
    eta: float | None = None  # reward guidance step size; None: GUIDANCE_ETA when a reward model is given
    guidance_steps: int = 1  # G (released default)
    tau: float = 1.0  # softmax temperature of the reward model's input
    early_exit: int | None = None  # stop a row once its argmax is unchanged for this many steps
    guidance_ckpt: bool | None = None  # recompute reward-model blocks in the guidance backward (None: if
    # what it keeps would not fit in the device's free memory, sample.recompute_reward_model)
    compile: bool = False  # torch.compile the model pass of each step (sample.compiled_predict)

    def check(self):
        """Refuse impossible values with the flag to fix."""
        for name, low in (("steps", 1), ("length", 0), ("total_length", 1), ("batch_size", 1),
                          ("guidance_steps", 1), ("early_exit", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number of at least {low}, got {value!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p} (for argmax: --argmax, top_p=None)")
        if self.eta is not None and not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"--eta must be a finite number >= 0, got {self.eta}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"--tau must be a finite number > 0 (it divides the logits), got {self.tau}")
        return self


def settings_for(generation_config: dict | None, max_len: int, **overrides) -> Settings:
    """A checkpoint's settings: its generation_config.json (written by train.py) or, without one (the
    released hamishivi/tess2), the released evaluation's (rows of 2048 positions, 100 steps, top-p 0.99);
    the total length at most what the model reads; then overrides (flags, or generate's keywords).
    An override of None leaves the field to the checkpoint, except top_p=None: argmax. Giving
    `length` alone drops the default total length, so that the rows are prompt + length."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {sorted(fields)}")
    overrides = {k: v for k, v in overrides.items() if v is not None or k == "top_p"}
    base = {k: v for k, v in (generation_config or {}).items() if k in fields}
    if "length" in overrides and "total_length" not in overrides:
        base["total_length"] = None
    if "total_length" in overrides and "length" not in overrides:
        base["length"] = None
    s = Settings(**{**base, **overrides})
    if "total_length" not in overrides and s.total_length is not None and s.total_length > max_len:
        s.total_length = max_len
    return s.check()


def given(flags) -> dict:
    """The Settings fields a command line gives: its flags share the fields' names (dest) and default
    to None, the checkpoint's; --argmax gives top_p None."""
    out = {f.name: getattr(flags, f.name) for f in dataclasses.fields(Settings)
           if getattr(flags, f.name, None) is not None}
    if getattr(flags, "argmax", False):
        out["top_p"] = None
    return out


def read_prompts(path):
    """One prompt per line; in a .jsonl file, a JSON string or {"prompt": ...} per line (--prompts-file)."""
    if os.path.isdir(path):
        raise ValueError(f"--prompts-file {path} is a directory: pass a text file, one prompt per line")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"--prompts-file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not path.endswith(".jsonl"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            o = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not JSON ({e.msg}); each line is a JSON string or "
                             "{\"prompt\": ...}") from None
        if isinstance(o, dict) and isinstance(o.get("prompt"), str):
            o = o["prompt"]
        if not isinstance(o, str):
            raise ValueError(f"{path}, line {n}: expected a JSON string or an object with a \"prompt\" string")
        prompts.append(o)
    return prompts


# -----------------------------------------------------------------------------
# Prompts -> rows: context ids, span mask, row length


def encode_prompt(tokenizer, prompt: str, chat: bool = True, placeholder: int = 0):
    """One prompt -> (ids, span) lists: BOS + the prompt, stripped and in the Tulu chat template
    "<|user|>\\n{prompt}\\n<|assistant|>\\n" as in training (§8) unless chat=False. `<mask:N>`
    marks a gap of N span positions (filled with `placeholder`, never read); such a prompt is used as
    written, never templated (write the template out to infill an answer), and spaces next to a gap
    go: generated tokens carry their own."""
    parts = GAP.split(prompt)  # text, N, text, N, ..., text
    if len(parts) == 1:
        ids = data.chat.encode_prompt(tokenizer, prompt) if chat else [tokenizer.bos_id] + tokenizer.encode(prompt)
        return ids, [False] * len(ids)
    ids, span = [tokenizer.bos_id], [False]
    for j, part in enumerate(parts):
        if j % 2:  # a gap
            if not part.isdigit() or int(part) < 1:
                raise ValueError(f"<mask:{part}> in prompt {prompt!r}: a gap is <mask:N> with N a whole number >= 1")
            piece, gap = [placeholder] * int(part), True
        else:
            text = part.lstrip() if j > 0 else part
            text = text.rstrip() if j < len(parts) - 1 else text
            piece, gap = tokenizer.encode(text) if text else [], False
        ids += piece
        span += [gap] * len(piece)
    return ids, span


@dataclass
class Batch:
    prompts: list
    ids: torch.Tensor  # (B, L) context tokens; span and padding positions hold a placeholder
    span_mask: torch.Tensor  # (B, L) bool: positions to generate
    lengths: list  # each row's own length; positions beyond it are padding, masked out of attention
    ends: list  # where each prompt ends and its generation region begins
    seeds: list


def row_length(n_prompt: int, gaps: bool, s: Settings) -> int:
    """A row's length: a prompt with gaps is used as written (plus s.length positions if given);
    otherwise the prompt plus s.length positions, or s.total_length in all."""
    if gaps or s.length is not None:
        return n_prompt + (s.length or 0)
    if s.total_length is None:
        raise ValueError("neither --length nor --total-length is set: pass one")
    return s.total_length


def make_batch(tokenizer, prompts, s: Settings, max_len: int, fill: int, first: int = 0) -> Batch:
    """Prompts first, first+1, ... -> one batch. Rows shorter than the batch are padded and masked
    out of attention, so each row computes what it would alone."""
    encoded = [encode_prompt(tokenizer, p, s.chat, fill) for p in prompts]  # [(ids, span)]
    lengths = []
    for j, (ids, span) in enumerate(encoded, first):
        n, need = row_length(len(ids), any(span), s), f"prompt {j} has {len(ids)} tokens"
        if n < len(ids) or (n == len(ids) and not any(span)):
            raise ValueError(f"{need} and leaves nothing to generate in rows of {n}: raise --total-length, pass "
                             "--length N, or put <mask:N> gaps in it")
        if s.total_length is not None and n > s.total_length and not any(span):
            raise ValueError(f"{need}: with --length {s.length} it needs {n} positions, over --total-length "
                             f"{s.total_length}")
        if n > max_len:
            raise ValueError(f"{need} and needs rows of {n} positions, but the model reads at most {max_len}: "
                             "shorten it or lower --length / --total-length")
        lengths.append(n)
    L = max(lengths)
    ids = torch.tensor([x + [fill] * (L - len(x)) for x, _ in encoded])  # (B, L)
    span_mask = torch.tensor([sp + [True] * (n - len(sp)) + [False] * (L - n)
                              for (_, sp), n in zip(encoded, lengths)])  # (B, L)
    return Batch(list(prompts), ids, span_mask, lengths, [len(x) for x, _ in encoded],
                 [s.seed + j for j in range(first, first + len(prompts))])


def plan(tokenizer, prompts, s: Settings, args: ModelArgs) -> list[Batch]:
    """All batches of a run, checked before any sampling: prompt j gets seed s.seed + j."""
    fill = tokenizer.pad_id if tokenizer.pad_id < args.vocab_size else tokenizer.eos_id  # never read
    return [make_batch(tokenizer, prompts[i:i + s.batch_size], s, args.max_length, fill, i)
            for i in range(0, len(prompts), s.batch_size)]


@dataclass
class Generation:
    prompt: str
    text: str  # the generated text; for a prompt with gaps, the whole document filled in
    tokens: list  # generated ids: the gaps, then the region cut at the first EOS, [PAD] dropped
    steps_used: int = 0
    seconds: float = 0.0  # wall time of its batch
    predictions: torch.Tensor | None = None  # (n, L) argmax token at each step (record=True)
    confidence: torch.Tensor | None = None  # (n, L) top-1 probability at each step (record=True)


def decode_row(tokenizer, prompt, row, span, end):
    """A sampled row -> Generation: the region after the prompt is cut at its first EOS, [PAD] dropped."""
    tail = row[end:]
    if tokenizer.eos_id in tail:
        tail = tail[:tail.index(tokenizer.eos_id)]
    tail = [x for x in tail if x != tokenizer.pad_id]
    gaps = [x for x, is_span in zip(row[:end], span[:end]) if is_span]
    if not gaps:
        return Generation(prompt, tokenizer.decode(tail), tail)
    specials = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    doc = [x for x, is_span in zip(row[1:end], span[1:end]) if not (is_span and x in specials)]  # prompt, gaps filled
    return Generation(prompt, tokenizer.decode(doc + tail), gaps + tail)
