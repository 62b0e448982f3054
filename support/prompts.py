"""
Prompts in, texts out: how prompts become the rows that sample.py's reverse process fills, and rows
become text (METHOD.md §9), with the one home of the generation settings (Settings): the
checkpoint's generation_config.json, else the released evaluation's, then what a caller or a flag
gives.

A row is BOS + the prompt in the Tulu chat template (context: clean tokens that never change) +
a generation region (span). A prompt is a text or a chat of several turns (a list of messages);
`<mask:N>` in a text is a gap of N span positions (infilling).
Under torchrun the batches of a run are spread over its processes (spread), prompt j keeping its
seed + j. sample.py's command line also takes from here its prompts (flag_prompts), its device
(pick_device) and the printing of its answers (print_answers).
"""
import atexit
import dataclasses
import itertools
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch

import data.chat
from model import ModelArgs

GAP = re.compile(r"<mask:([^>]*)>")


# -----------------------------------------------------------------------------
# Settings: the checkpoint's generation_config.json, else the released evaluation's; then overrides

GUIDANCE_ETA = 0.25  # eta when a reward model is given and eta is not: the paper's best for TESS 2 v0.1 (Table 3a)


SAMPLERS = ("stochastic", "ddim")  # re-noising: fresh noise (Eq. 4, released) or the implied noise (METHOD.md §9)
SEED_LIMIT = 2**63  # seeds are int64; prompt j's seed + j stays inside a generator's range (below 2**64)


def flag_name(field: str) -> str:
    """How a command line names a Settings field: --total-length."""
    return "--" + field.replace("_", "-")


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
    shed: int | None = None  # a row stops computing its trailing [PAD] once settled this many steps (None: never)
    sampler: str = "stochastic"  # re-noising: "stochastic" (fresh noise, as released) or "ddim" (deterministic)

    def check(self, name=flag_name):
        """Refuse impossible values, each named by name(field): the flag to fix (default), or a file's key."""
        for field, low in (("steps", 1), ("length", 0), ("total_length", 1), ("batch_size", 1),
                           ("guidance_steps", 1), ("early_exit", 1), ("shed", 1)):
            value = getattr(self, field)
            if value is not None and not (whole(value) and value >= low):
                raise ValueError(f"{name(field)} must be a whole number of at least {low}, got {value!r}")
        if not (whole(self.seed) and 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"{name('seed')} must be a whole number in [0, 2**63), got {self.seed!r}")
        if self.top_p is not None and not (finite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"{name('top_p')} must be in (0, 1], got {self.top_p!r} "
                             "(for argmax: --argmax, top_p=None)")
        if self.eta is not None and not (finite(self.eta) and self.eta >= 0):
            raise ValueError(f"{name('eta')} must be a finite number >= 0, got {self.eta!r}")
        if not (finite(self.tau) and self.tau > 0):
            raise ValueError(f"{name('tau')} must be a finite number > 0 (it divides the logits), got {self.tau!r}")
        for field in ("chat", "compile", "guidance_ckpt"):
            value = getattr(self, field)
            if not isinstance(value, bool) and not (field == "guidance_ckpt" and value is None):
                raise ValueError(f"{name(field)} must be true or false, got {value!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"{name('sampler')} must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        return self


def whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def settings_for(generation_config: dict | None, max_len: int, where: str = "the checkpoint's generation_config.json",
                 **overrides) -> Settings:
    """A checkpoint's settings: its generation_config.json (written by train.py) or, without one (the
    released hamishivi/tess2), the released evaluation's (rows of 2048 positions, 100 steps, top-p 0.99);
    the total length at most what the model reads; then overrides (flags, or generate's keywords).
    An override of None leaves the field to the checkpoint, except top_p=None: argmax. Giving
    `length` alone drops the default total length, so that the rows are prompt + length. A bad value
    of the file is blamed on it (`where`, its path, and the key), one of an override on its flag."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {sorted(fields)}")
    if generation_config is not None and not isinstance(generation_config, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(generation_config).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None or k == "top_p"}
    base = {k: v for k, v in (generation_config or {}).items() if k in fields}
    Settings(**{k: v for k, v in base.items() if k not in overrides}).check(lambda field: f"{where}: {field}")
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
    """One prompt per line; in a .jsonl file, a JSON string, {"prompt": ...} or a chat {"messages": [{"role",
    "content"}, ...]} (a prompt of several turns) per line (--prompts-file). A file without a prompt is
    refused, by its name."""
    if os.path.isdir(path):
        raise ValueError(f"--prompts-file {path} is a directory: pass a text file, one prompt per line")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"--prompts-file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not lines:
        raise ValueError(f"--prompts-file {path} holds no prompt (it is empty or blank): write one prompt per line")
    if not path.endswith(".jsonl"):
        return [line for _, line in lines]
    return [json_prompt(path, n, line) for n, line in lines]


def flag_prompts(prompts, prompts_file):
    """The command line's prompts: each --prompt, then --prompts-file's; at least one."""
    out = (prompts or []) + (read_prompts(prompts_file) if prompts_file else [])
    if not out:
        raise ValueError("no prompt: pass --prompt TEXT or --prompts-file FILE")
    return out


def json_prompt(path, n, line):
    """The prompt of line n of a .jsonl prompts file: a string, or a chat's list of messages."""
    expected = "each line is a JSON string, {\"prompt\": ...} or {\"messages\": [...]}"
    try:
        o = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {n}: not JSON ({e.msg}); {expected}") from None
    if isinstance(o, dict) and "messages" in o:
        try:
            check_chat(o["messages"])
        except ValueError as e:
            raise ValueError(f"{path}, line {n}: {e}") from None
        return o["messages"]
    if isinstance(o, dict) and isinstance(o.get("prompt"), str):
        o = o["prompt"]
    if not isinstance(o, str):
        raise ValueError(f"{path}, line {n}: expected a JSON string or an object with a \"prompt\" string "
                         "or a \"messages\" list")
    return o


def is_chat(prompt) -> bool:
    """Whether a prompt is a chat (a list of messages) rather than a text."""
    return isinstance(prompt, list)


def check_chat(messages):
    """A chat to answer: data.chat's messages (roles system, user, assistant; string contents), the
    last the user's. `<mask:N>` in a chat is refused: infilling takes a prompt as written."""
    data.chat.check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message is the {messages[-1]['role']}'s: a chat to answer ends with a user message")
    if any(GAP.search(m["content"]) for m in messages):
        raise ValueError("a chat's messages cannot hold <mask:N> gaps: infilling uses a prompt as written, "
                         "a text with the template written out")


def prompt_text(prompt) -> str:
    """A prompt as a person reads it: the text, or a chat's turns in the template's role markers."""
    if not is_chat(prompt):
        return prompt
    return "".join(f"<|{m['role']}|>\n{m['content'].strip()}\n" for m in prompt)


# -----------------------------------------------------------------------------
# Prompts -> rows: context ids, span mask, row length


def gap_size(spec: str, prompt: str, max_len: int | None = None) -> int:
    """N of a gap `<mask:N>` (spec is the text between "<mask:" and ">"): a whole number >= 1 written
    in the digits 0-9, at most the positions the model reads. Anything else is refused by its cause."""
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    where = f"<mask:{spec}> in prompt {shown!r}"
    rule = "a gap is <mask:N> with N a whole number >= 1"
    if re.fullmatch(r"[0-9]+", spec):
        n = int(spec)
        if n == 0:
            raise ValueError(f"{where}: a gap of 0 tokens leaves nothing to fill; {rule}")
        if max_len is not None and n > max_len:
            raise ValueError(f"{where}: a gap of {n} tokens is longer than the {max_len} positions the model reads")
        return n
    if spec != spec.strip():
        raise ValueError(f"{where}: no spaces inside the brackets; {rule}")
    if re.fullmatch(r"-[0-9]+", spec):
        raise ValueError(f"{where}: a gap cannot have a negative size; {rule}")
    raise ValueError(f"{where}: {spec!r} is not a number written in the digits 0-9; {rule}")


def encode_pieces(tokenizer, pieces: list[str]) -> list[list[int]]:
    """The ids of each text piece of a prompt with gaps, tokenised as the piece reads in running text:
    the pieces are joined, encoded once and cut where each piece begins. A byte-level BPE (the shipped
    model's) puts the space before a word into that word's token (" be" is one token), and a
    SentencePiece tokenizer adds a space only at the start of a text; either way decoding the row gives
    back every space, newline and punctuation mark as written. Where a token would span a cut (the
    pieces around a gap merge: "th<mask:1>e"), each piece is encoded on its own."""
    encoding = tokenizer.tokenizer.encode("".join(pieces), add_special_tokens=False)
    cuts = list(itertools.accumulate(len(piece) for piece in pieces[:-1]))  # where pieces 1, 2, ... begin
    if any(start < cut < end for start, end in encoding.offsets for cut in cuts):
        return [tokenizer.encode(piece) if piece else [] for piece in pieces]
    firsts = [next((k for k, (start, _) in enumerate(encoding.offsets) if start >= cut), len(encoding.ids))
              for cut in cuts]  # each piece's first token
    bounds = [0, *firsts, len(encoding.ids)]
    return [encoding.ids[a:b] for a, b in zip(bounds, bounds[1:])]


def encode_prompt(tokenizer, prompt, chat: bool = True, placeholder: int = 0, max_len: int | None = None):
    """One prompt -> (ids, span) lists: BOS + the prompt, stripped and in the Tulu chat template
    "<|user|>\\n{prompt}\\n<|assistant|>\\n" as in training (§8) unless chat=False. A chat (a list of
    {"role", "content"} messages, the last the user's) is always templated, every turn as in training
    (data.chat.encode_chat_prompt). `<mask:N>` in a text marks a gap of N span positions (filled with
    `placeholder`, never read); such a prompt is used exactly as written, spaces and newlines next to a
    gap included (encode_pieces), never templated (write the template out to infill an answer)."""
    if is_chat(prompt):
        check_chat(prompt)
        ids = data.chat.encode_chat_prompt(tokenizer, prompt)
        return ids, [False] * len(ids)
    parts = GAP.split(prompt)  # text, N, text, N, ..., text
    if len(parts) == 1:
        ids = data.chat.encode_prompt(tokenizer, prompt) if chat else [tokenizer.bos_id] + tokenizer.encode(prompt)
        return ids, [False] * len(ids)
    sizes = [gap_size(spec, prompt, max_len) for spec in parts[1::2]]
    ids, span = [tokenizer.bos_id], [False]
    for j, piece in enumerate(encode_pieces(tokenizer, parts[::2])):
        gap = [placeholder] * sizes[j] if j < len(sizes) else []
        ids += piece + gap
        span += [False] * len(piece) + [True] * len(gap)
    return ids, span


@dataclass
class Batch:
    prompts: list  # texts, or chats (lists of messages)
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
    encoded = [encode_prompt(tokenizer, p, s.chat, fill, max_len) for p in prompts]  # [(ids, span)]
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
    prompt: str | list  # a text, or a chat's messages
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


def empty_answer(g: Generation) -> str | None:
    """What the model produced when a generation's answer reads as empty, in words (sample.py's note),
    or None when it holds text."""
    if g.text.strip():
        return None
    if not g.tokens:
        return "the model ended it at once (its first token is the end of text)"
    if not g.text:
        return f"the model produced {len(g.tokens)} special tokens, which decode to no text"
    shown = repr(g.text if len(g.text) <= 40 else g.text[:40] + "...")
    kind = "newlines" if set(g.text) == {"\n"} else "whitespace"
    return f"the model produced only {kind}: {len(g.tokens)} tokens, {shown}"


def print_answer(g, j, as_json: bool, several: bool):
    """Prompt j's answer on stdout (its text, or a JSON object), and a note on stderr if it is empty."""
    note = empty_answer(g)
    if note:
        print(f"sample.py: note: prompt {j} got an empty answer: {note}", file=sys.stderr)
    print(json.dumps(dict(prompt=g.prompt, text=g.text, tokens=g.tokens, steps_used=g.steps_used,
                          seconds=round(g.seconds, 3))) if as_json else g.text + "\n" * several, flush=True)


def print_answers(gathered, first: bool, as_json: bool, several: bool) -> list:
    """Every Generation of `spread`'s (batch, Generations) pairs, in prompt order; the first process prints
    each answer as it comes (print_answer)."""
    out = []
    for _, gens in gathered:
        for j, g in enumerate(gens if first else (), len(out)):
            print_answer(g, j, as_json, several)
        out += gens
    return out


# -----------------------------------------------------------------------------
# Devices, and prompts across processes: `torchrun --nproc_per_node N` splits a run's batches over N processes


def processes() -> tuple[int, int]:
    """(rank, number of processes) of this run. Under torchrun (WORLD_SIZE > 1) the default process
    group is started once, with gloo: only texts and scores travel between the processes, each of
    which samples on its own device (process_device). Alone: (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def process_device(name: str) -> str:
    """The device of this process: under torchrun "cuda" is the process's own GPU (LOCAL_RANK, taken
    round the GPUs there are), as the processes of one machine share its GPUs."""
    if name != "cuda" or processes()[1] == 1 or not torch.cuda.is_available():
        return name
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def pick_device(name):
    """The torch device a --device flag names: cpu, or cuda (cuda:N) where this machine has it."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: sampling runs on cpu or cuda")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"--device {name}: a CPU has no index: use cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU visible to PyTorch; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return dev




def spread(jobs: list, run):
    """Yields (job, run(job)) for every job, in order, on every process: the processes of the run take
    turns, process k running jobs k, k + n, k + 2n, ... (n processes), and after each round of n jobs
    every process receives the round's results (torch.distributed.all_gather_object). A batch keeps
    its seeds whichever process samples it, so the results are the one-process run's."""
    rank, size = processes()
    for first in range(0, len(jobs), size):
        round_jobs = jobs[first:first + size]
        mine = run(round_jobs[rank]) if rank < len(round_jobs) else None
        results = [mine]
        if size > 1:
            import torch.distributed as dist
            results = [None] * size
            dist.all_gather_object(results, mine)
        yield from zip(round_jobs, results)
