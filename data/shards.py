"""On-disk datasets and the loaders train.py uses.

A dataset is a folder with a meta.json and raw little-endian arrays read with np.memmap:

  kind "tokens" (adapt, ar)  tokens_00000.bin ...   one stream: each document as BOS + text + EOS (METHOD.md §7)
  kind "spans"  (sft)        tokens.bin, tokens_offsets.bin (int64, N+1), span_mask.bin (uint8, one flag
                             per token: 1 = span, an assistant reply and its EOS), prompt_lens.bin (int64, N:
                             where the first span starts; a folder without span_mask.bin has one span each,
                             from there to the end)
  kind "pairs"  (reward)     chosen.bin, chosen_offsets.bin, rejected.bin, rejected_offsets.bin,
                             prompt_lens.bin (the prompt is the same tokens at the start of both)

Token files are uint16 when the vocabulary fits (<= 65535 ids), else uint32. meta.json lists
every file with its dtype and element count, so a truncated file is caught when it is opened.
Every file is written under a temporary name and renamed; meta.json is written last, so a
folder without meta.json is an unfinished prepare, never a dataset that looks complete. The
prepare scripts build a dataset in a staging folder and move it in with replace_dataset; meta.json
carries the fingerprint of the run that made it (dataset_done).

Sampling is a pure function of (global index, seed): index i is in epoch i // n and reads
example perm[i % n], where perm is a permutation seeded by (seed, epoch). Resuming needs only
the step; ranks given disjoint index ranges read disjoint examples within an epoch.
"""

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch

from support.cli import atomic_write, replace_files

FORMAT = 1
# what a writer needs from the tokenizer (tokenizer.Tokenizer.meta() gives exactly these)
TOKENIZER_KEYS = ("vocab_size", "bos_id", "eos_id", "pad_id", "tokenizer", "tokenizer_sha256", "vocab_sha256")
REQUIRED = ("kind", "format", "dtype", "source", "files") + TOKENIZER_KEYS
# what each kind reads besides REQUIRED: meta.json keys, and files (a tokens dataset's are its meta["shards"])
KINDS = {"tokens": ("shards", "num_tokens"), "spans": ("num_examples", "num_tokens"),
         "pairs": ("num_examples", "num_tokens")}
KIND_FILES = {"spans": ("tokens.bin", "tokens_offsets.bin", "prompt_lens.bin"),  # + span_mask.bin, if written
              "pairs": ("chosen.bin", "chosen_offsets.bin", "rejected.bin", "rejected_offsets.bin", "prompt_lens.bin")}
PREPARE = "python -m data.shakespeare, data.dolma, data.tulu or data.preferences"


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 65535 else "uint32"


def _np_dtype(name):
    return np.dtype(name).newbyteorder("<")


# ----------------------------------------------------------------------------- writing

class ArrayFile:
    """Appends arrays to .tmp-NAME; commit() renames it to NAME. Returns its entry for meta["files"].
    (support.run_folder.clean removes a .tmp-* file that a killed run left.)"""

    def __init__(self, folder, name, dtype):
        self.path, self.name, self.dtype = Path(folder) / name, name, dtype
        self.tmp = self.path.with_name(".tmp-" + name)
        self.f, self.count = open(self.tmp, "wb"), 0

    def append(self, values):
        arr = np.asarray(values)
        info = np.iinfo(self.dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError(f"{self.name}: value out of range for {self.dtype}")
        self.f.write(arr.astype(_np_dtype(self.dtype)).tobytes())
        self.count += arr.size

    def commit(self):
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"dtype": self.dtype, "count": self.count}


def _full_meta(path, meta):
    missing = [k for k in TOKENIZER_KEYS + ("source",) if k not in meta]
    if missing:
        raise ValueError(f"meta for {path} lacks {missing}: pass tokenizer.Tokenizer.meta() plus a 'source'")
    return dict(meta, format=FORMAT, dtype=token_dtype(meta["vocab_size"]))


def _start(path, meta):
    meta, path = _full_meta(path, meta), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stale = path / "meta.json"
    if stale.exists():
        stale.unlink()  # we are rewriting this dataset: it is incomplete until the new meta lands
    return path, meta


def write_tokens(path, arrays, meta, shard_tokens=2**28):
    """Writes a "tokens" dataset from an iterable of 1-D token arrays (documents, each already
    ending in EOS), cut into shard files of at most shard_tokens tokens (512 MiB of uint16)."""
    path, meta = _start(path, meta)
    shards, files, current = [], {}, None
    for arr in arrays:
        arr = np.asarray(arr)
        while arr.size:
            if current is None:
                current = ArrayFile(path, f"tokens_{len(shards):05d}.bin", meta["dtype"])
                shards.append(current.name)
            room = shard_tokens - current.count
            current.append(arr[:room])
            arr = arr[room:]
            if current.count == shard_tokens:
                files[current.name], current = current.commit(), None
    if current is not None:
        files[current.name] = current.commit()
    return finish_tokens(path, meta, shards, files)


def finish_tokens(path, meta, shards, files):
    """Writes meta.json for a tokens dataset whose shard files are already in place."""
    meta = dict(_full_meta(path, meta), kind="tokens", shards=list(shards), files=files,
                num_tokens=sum(files[s]["count"] for s in shards))
    atomic_write(Path(path) / "meta.json", meta)
    return meta


def span_flags(i, ids, span):
    """Example i's span mask (one bool per token) from what a writer is given: a prompt_len (context
    ids[:prompt_len], one span to the end: data.chat.encode_example) or a mask (data.chat.encode_chats)."""
    if isinstance(span, (int, np.integer)):
        if not 1 <= span < len(ids):
            raise ValueError(f"example {i}: prompt_len {span} must be in [1, {len(ids)}): "
                             "BOS is context and the response needs at least its EOS")
        return np.arange(len(ids)) >= span
    mask = np.asarray(span, dtype=bool)
    if mask.shape != (len(ids),) or mask[0] or not mask.any():
        raise ValueError(f"example {i}: its span mask needs one flag per token ({len(ids)}), BOS as context "
                         "and at least one span token")
    return mask


def write_spans(path, examples, meta):
    """Writes a "spans" dataset. examples: iterable of (ids, prompt_len) as made by
    data.chat.encode_example (ids = BOS + prompt + response + EOS, ids[:prompt_len] is context), or
    of (ids, span_mask) as made by data.chat.encode_chats (every assistant reply and its EOS a span)."""
    path, meta = _start(path, meta)
    tokens, masks = ArrayFile(path, "tokens.bin", meta["dtype"]), ArrayFile(path, "span_mask.bin", "uint8")
    offsets, prompt_lens = [0], []
    for i, (ids, span) in enumerate(examples):
        mask = span_flags(i, ids, span)
        tokens.append(ids)
        masks.append(mask.astype(np.uint8))
        offsets.append(tokens.count)
        prompt_lens.append(int(mask.argmax()))  # the first span token
    files = {"tokens.bin": tokens.commit(), "span_mask.bin": masks.commit(),
             "tokens_offsets.bin": _write_array(path, "tokens_offsets.bin", offsets),
             "prompt_lens.bin": _write_array(path, "prompt_lens.bin", prompt_lens)}
    meta = dict(meta, kind="spans", files=files, num_examples=len(prompt_lens), num_tokens=tokens.count)
    atomic_write(path / "meta.json", meta)
    return meta


def write_pairs(path, pairs, meta):
    """Writes a "pairs" dataset. pairs: iterable of (chosen_ids, rejected_ids, prompt_len); both
    sequences are BOS + the same prompt tokens + a response + EOS."""
    path, meta = _start(path, meta)
    data = {side: ArrayFile(path, f"{side}.bin", meta["dtype"]) for side in ("chosen", "rejected")}
    offsets, prompt_lens = {"chosen": [0], "rejected": [0]}, []
    for i, (chosen, rejected, prompt_len) in enumerate(pairs):
        if not 1 <= prompt_len < min(len(chosen), len(rejected)):
            raise ValueError(f"pair {i}: prompt_len {prompt_len} leaves no response in one of the sequences")
        if list(chosen[:prompt_len]) != list(rejected[:prompt_len]):
            raise ValueError(f"pair {i}: chosen and rejected must start with the same prompt tokens")
        for side, ids in (("chosen", chosen), ("rejected", rejected)):
            data[side].append(ids)
            offsets[side].append(data[side].count)
        prompt_lens.append(prompt_len)
    files = {"prompt_lens.bin": _write_array(path, "prompt_lens.bin", prompt_lens)}
    for side in ("chosen", "rejected"):
        files[f"{side}.bin"] = data[side].commit()
        files[f"{side}_offsets.bin"] = _write_array(path, f"{side}_offsets.bin", offsets[side])
    meta = dict(meta, kind="pairs", files=files, num_examples=len(prompt_lens),
                num_tokens=data["chosen"].count + data["rejected"].count)
    atomic_write(path / "meta.json", meta)
    return meta


def _write_array(folder, name, values, dtype="int64"):
    f = ArrayFile(folder, name, dtype)
    f.append(values)
    return f.commit()


def dataset_done(path, key=None):
    """True if a finished dataset that open_dataset can read is at path and, given a key, was made by
    the run with that fingerprint (support.cli.fingerprint of its inputs and settings, in meta.json).
    One with missing or truncated files, of an older layout, or of another run is to be written again."""
    meta_path = Path(path) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        check_layout(path, meta if isinstance(meta, dict) else {})
    except (ValueError, OSError):
        return False
    return key is None or meta.get("fingerprint") == key


def replace_dataset(staging, target):
    """Moves the dataset written in the folder `staging` into `target` as one set (support.cli.replace_files):
    target's meta.json and the files it lists go, the new files come in, the new meta.json last."""
    try:
        old = list(json.loads((Path(target) / "meta.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        old = []  # no readable dataset there: nothing of it to remove
    replace_files(staging, target, "meta.json", [name for name in old if "/" not in name])


# ----------------------------------------------------------------------------- reading

def open_dataset(path):
    """Opens a prepared dataset folder; returns a TokenDataset, SpanDataset or PairDataset."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no dataset folder at {path}: run a prepare script first ({PREPARE})")
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} has no meta.json: its prepare run did not finish, or this is not a "
                                "dataset folder. Re-run the prepare script (it resumes).")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}): delete {path} and prepare it again") from None
    check_layout(path, meta)
    cls = {"tokens": TokenDataset, "spans": SpanDataset, "pairs": PairDataset}[meta["kind"]]
    return cls(path, meta)


def check_layout(path, meta):
    """Checks up front that meta.json has every key and lists every file its kind reads, and that each
    listed file is there with the size meta.json gives it, so that no read fails halfway with a KeyError."""
    meta_path, kind = Path(path) / "meta.json", meta.get("kind")
    again = f"re-run the prepare script that made it ({PREPARE}) to write it again"
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}: it was not written by data/shards.py; {again}")
    if kind not in KINDS:
        raise ValueError(f"{meta_path}: unknown kind {kind!r}, expected one of {tuple(KINDS)}")
    if meta["format"] != FORMAT:
        raise ValueError(f"{meta_path}: format {meta['format']}, this code reads format {FORMAT}; {again}")
    missing = [k for k in KINDS[kind] if k not in meta]
    if not missing:
        needed = meta["shards"] if kind == "tokens" else KIND_FILES[kind]
        missing = [name for name in needed if name not in meta["files"]]
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}, which a {kind!r} dataset reads: it was written by an "
                         f"older version of data/shards.py; {again}")
    for name, entry in meta["files"].items():
        file = Path(path) / name
        expected = entry["count"] * np.dtype(entry["dtype"]).itemsize
        if not file.exists():
            raise FileNotFoundError(f"{file} is missing but listed in meta.json: delete {path} and prepare it again")
        if file.stat().st_size != expected:
            raise ValueError(f"{file} has {file.stat().st_size} bytes but meta.json says {entry['count']} x "
                             f"{entry['dtype']} = {expected}: it is truncated or from another run; "
                             f"delete {path} and prepare it again")


@functools.lru_cache(maxsize=4)
def epoch_permutation(n, seed, epoch):
    """The order of the n examples in one epoch: a pure function of (n, seed, epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def sample_positions(indices, n, seed):
    """Global sample indices -> example positions: index i reads perm(seed, i // n)[i % n]."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if n <= 0:
        raise ValueError("the dataset has no examples at this sequence length")
    if idx.size and idx.min() < 0:
        raise ValueError("sample indices must be >= 0")
    epoch, offset = np.divmod(idx, n)
    out = np.empty_like(idx)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = epoch_permutation(n, seed, int(e))[offset[sel]]
    return out


def global_indices(step, micro, rank, world, global_batch, micro_batch):
    """The sample indices one rank reads for one micro-batch. The global batch of step s is
    [s*GB, (s+1)*GB); rank r owns the contiguous slice [r*GB/W, (r+1)*GB/W) of it, and its
    micro-batch m is the m-th chunk of micro_batch indices of that slice. So one process with
    gradient accumulation and W processes see exactly the same global batch."""
    if global_batch % (world * micro_batch):
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world} x micro batch "
                         f"{micro_batch}: pass a global batch that is a multiple of {world * micro_batch}")
    steps = global_batch // (world * micro_batch)
    if not (0 <= rank < world and 0 <= micro < steps and step >= 0):
        raise ValueError(f"need step >= 0, 0 <= rank < {world}, 0 <= micro < {steps}; got {step}, {rank}, {micro}")
    start = step * global_batch + rank * (global_batch // world) + micro * micro_batch
    return list(range(start, start + micro_batch))


def span_row(ids, span_mask, seq_len, pad_id):
    """One SFT row of length seq_len (METHOD.md §8) and its mask: BOS and every system or user turn are
    context (False); every assistant reply with its EOS, and the padding after the last one, are the
    span (True). Too long: the row is cut on the right (a reply cut there has no EOS). If no span
    starts within the row, the row keeps BOS and the last seq_len // 2 - 1 context tokens before the
    first span, and the span fills the other half of the row."""
    ids, mask = [int(t) for t in ids], [bool(m) for m in span_mask]
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2 (BOS + one span token)")
    first = mask.index(True)
    if first >= seq_len:
        keep = seq_len // 2
        ids, mask = ids[:1] + ids[first - (keep - 1):], mask[:1] + mask[first - (keep - 1):]
    ids, mask = ids[:seq_len], mask[:seq_len]
    return ids + [pad_id] * (seq_len - len(ids)), mask + [True] * (seq_len - len(mask))


def pair_row(ids, prompt_len, seq_len, pad_id):
    """One reward-model row: (ids right-padded with pad_id to seq_len, index of the last real token).
    Too long: first the oldest prompt tokens go (BOS stays), down to half the row; then the response
    is cut on the right, keeping its final EOS so the reward is always read at an EOS."""
    ids = [int(t) for t in ids]
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2 (BOS + EOS)")
    if len(ids) > seq_len:
        prompt, response = ids[:prompt_len], ids[prompt_len:]
        keep = max(min(prompt_len, seq_len // 2), seq_len - len(response))
        prompt = prompt[:1] + prompt[len(prompt) - (keep - 1):] if keep > 1 else prompt[:1]
        room = seq_len - len(prompt)
        if len(response) > room:
            response = response[:room - 1] + response[-1:]
        ids = prompt + response
    return ids + [pad_id] * (seq_len - len(ids)), len(ids) - 1


class _Dataset:
    def __init__(self, path, meta):
        self.path, self.meta = Path(path), meta
        self._arrays = {}

    def array(self, name):
        """The memory-mapped contents of one file listed in meta["files"]."""
        if name not in self._arrays:
            entry = self.meta["files"][name]
            dtype = _np_dtype(entry["dtype"])
            self._arrays[name] = (np.memmap(self.path / name, dtype=dtype, mode="r", shape=(entry["count"],))
                                  if entry["count"] else np.zeros(0, dtype))
        return self._arrays[name]

    def num_examples(self, seq_len=None):
        return self.meta["num_examples"]

    def _sequence(self, name, i):
        """Example i of NAME.bin, whose examples start at NAME_offsets.bin."""
        offsets = self.array(f"{name}_offsets.bin")
        return self.array(f"{name}.bin")[offsets[i]:offsets[i + 1]]


class TokenDataset(_Dataset):
    """A packed token stream read as non-overlapping windows: window k = stream[k*L : (k+1)*L]."""

    def num_examples(self, seq_len):
        return self.meta["num_tokens"] // seq_len

    def read(self, start, end):
        """stream[start:end], across shard boundaries."""
        pieces, base = [], 0
        for name in self.meta["shards"]:
            n = self.meta["files"][name]["count"]
            lo, hi = max(start - base, 0), min(end - base, n)
            if lo < hi:
                pieces.append(self.array(name)[lo:hi])
            base += n
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def batch(self, indices, seq_len, seed):
        n = self.num_examples(seq_len)
        if n == 0:
            raise ValueError(f"{self.path} has {self.meta['num_tokens']} tokens, fewer than one window of "
                             f"{seq_len}: use a smaller seq_len or prepare more data")
        windows = [self.read(k * seq_len, (k + 1) * seq_len) for k in sample_positions(indices, n, seed)]
        return {"ids": torch.from_numpy(np.stack(windows).astype(np.int64))}  # (B, L)


class SpanDataset(_Dataset):
    """SFT examples (one or more spans each); batch() lays them out as METHOD.md §8 with span_row."""

    def example(self, i):
        """(ids, span mask) of example i. A dataset written before span_mask.bin has one span per
        example, from prompt_lens.bin to its end."""
        ids = self._sequence("tokens", i)
        if "span_mask.bin" not in self.meta["files"]:
            return ids, np.arange(len(ids)) >= self.array("prompt_lens.bin")[i]
        offsets = self.array("tokens_offsets.bin")
        return ids, self.array("span_mask.bin")[offsets[i]:offsets[i + 1]].astype(bool)

    def batch(self, indices, seq_len, seed):
        rows = [span_row(*self.example(i), seq_len, self.meta["pad_id"])
                for i in sample_positions(indices, self.num_examples(), seed)]
        return {"ids": torch.tensor([r for r, _ in rows], dtype=torch.long),          # (B, L)
                "span_mask": torch.tensor([m for _, m in rows], dtype=torch.bool)}    # (B, L)


class PairDataset(_Dataset):
    """Preference pairs for the reward model (METHOD.md §10); batch() pads them with pair_row."""

    def pair(self, i):
        return self._sequence("chosen", i), self._sequence("rejected", i), int(self.array("prompt_lens.bin")[i])

    def batch(self, indices, seq_len, seed):
        out = {"chosen": [], "rejected": [], "chosen_last": [], "rejected_last": []}
        for i in sample_positions(indices, self.num_examples(), seed):
            chosen, rejected, prompt_len = self.pair(i)
            for side, ids in (("chosen", chosen), ("rejected", rejected)):
                row, last = pair_row(ids, prompt_len, seq_len, self.meta["pad_id"])
                out[side].append(row)
                out[side + "_last"].append(last)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}  # (B, L) and (B,)


def check_tokenizer(meta, tokenizer):
    """Refuses a dataset made with another vocabulary. tokenizer: the model's vocabulary size (int),
    or a tokenizer.json file / a folder with one (then the id -> token tables must match too)."""
    if isinstance(tokenizer, (int, np.integer)):
        if meta["vocab_size"] != tokenizer:
            raise ValueError(f"the data was tokenized with {meta['vocab_size']} ids ({meta['tokenizer']}) but the "
                             f"model has a vocabulary of {tokenizer}: prepare the data again with the model's "
                             "tokenizer (--tokenizer), or train a model with the data's tokenizer")
        return
    from support.tokenizer import Tokenizer
    info = Tokenizer(tokenizer)
    if info.vocab_size != meta["vocab_size"] or info.vocab_sha256 != meta["vocab_sha256"]:
        raise ValueError(f"the data was tokenized with {meta['tokenizer']} ({meta['vocab_size']} ids) but the "
                         f"tokenizer at {tokenizer} differs ({info.vocab_size} ids, other tokens): prepare the "
                         "data again with --tokenizer pointing at the model's tokenizer")
