"""The Tulu 2 SFT mixture as a "spans" dataset for instruction tuning (METHOD.md §8).

    python -m data.tulu --tokenizer mistralai/Mistral-7B-v0.1 --out out/tulu
    python -m data.tulu --tokenizer out/shakespeare --input chats.jsonl --out out/chats

Every turn of each conversation, in one row, formatted with the Tulu template of data/chat.py:
every assistant reply (with its EOS) is a span, every system or user message context. Messages
after the last reply are left out. --first-turn-only keeps what the released code kept: the first
user message and the first assistant reply (a leading system message dropped).
Records are {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
(Tulu's format) or {"user": ..., "assistant": ...}. Skipped and counted in meta.json: records
that hold no such chat, and chats whose context before the first reply is >= --max-len tokens (no
room left for a reply). A run that keeps no chat at all is an error that says why.

From the Hub: allenai/tulu-v2-sft-mixture holds its ~326k conversations as three parquet files
(data/train-0000N-of-00003-*.parquet); reading parquet needs `pip install pyarrow`, which tess2
does not install. The dataset is built beside --out and moved in when complete, so --out holds the
previous dataset or the new one, never a mix; one run at a time. A re-run with the same inputs
and flags does nothing; any other run prepares the dataset again.
"""

import itertools
from collections import Counter

from data.chat import conversation, encode_chats, first_turn
from data.shards import dataset_done, replace_dataset, write_spans
from data.sources import input_files, positive, prepare_parser, read_records, run_key
from support.cli import OutputFolder, run_cli
from support.tokenizer import Tokenizer


def first_exchange(record):
    """The released code's reading of a record (--first-turn-only): its first user message and reply."""
    turn = first_turn(record)
    if turn is None:
        raise ValueError("no user message followed by an assistant reply at its start")
    return [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]


def conversations(files, first_turn_only, counts, problems):
    """The messages of every usable record; the others are counted, and the first one's reason kept."""
    for _, path in files:
        for n, record in enumerate(read_records(path), 1):
            try:
                messages = first_exchange(record) if first_turn_only else conversation(record)
            except ValueError as e:
                counts["skipped_no_first_turn" if first_turn_only else "skipped_no_chat"] += 1
                if not problems:
                    problems.append(f"{path}, record {n}: {e}")
                continue
            yield messages


def encoded(tok, chats, max_len, counts, chunk=1024):
    """(ids, span_mask) of each chat, tokenized a chunk at a time; a chat whose first reply starts at
    or after max_len is skipped."""
    chats = iter(chats)
    while batch := list(itertools.islice(chats, chunk)):
        for ids, mask in encode_chats(tok, batch):
            if mask.index(True) >= max_len:
                counts["skipped_long_prompt"] += 1
                continue
            yield ids, mask


def why_empty(counts, problems, max_len):
    """The message for a run that kept no chat."""
    if counts["skipped_long_prompt"]:
        return (f"every usable chat's context before the first reply is --max-len {max_len} tokens or more "
                f"({counts['skipped_long_prompt']} chats): pass a larger --max-len")
    if problems:
        return f"no usable chat among {sum(counts.values())} records; the first: {problems[0]}"
    return "the input holds no records"


def main(argv=None):
    p = prepare_parser(__doc__, prog="python -m data.tulu", out="out/tulu", dataset="allenai/tulu-v2-sft-mixture",
                       files="data/*.parquet")
    p.add_argument("--max-len", type=positive, default=2048, help="skip chats whose context before the first "
                                                                   "reply is this long")
    p.add_argument("--limit", type=positive, help="stop after this many conversations (for quick experiments)")
    p.add_argument("--first-turn-only", action="store_true", help="keep only the first user message and reply of "
                                                                  "each chat, as the released code did")
    args = p.parse_args(argv)

    tok = Tokenizer(args.tokenizer)
    files, source = input_files(args)
    settings = dict(max_len=args.max_len, limit=args.limit, first_turn_only=args.first_turn_only)
    key = run_key(tok, files, settings)
    with OutputFolder(args.out, "--out") as out:
        if dataset_done(args.out, key):
            print(f"{args.out} is already prepared: nothing to do")
            return
        counts, problems = Counter(), []  # filled in while the examples stream into the writer
        chats = itertools.islice(conversations(files, args.first_turn_only, counts, problems), args.limit)
        staging = out.staging("dataset")
        meta = write_spans(staging, encoded(tok, chats, args.max_len, counts),
                           dict(tok.meta(), source=source, **settings, counts=counts, fingerprint=key))
        if meta["num_examples"] == 0:
            raise ValueError(why_empty(counts, problems, args.max_len))
        replace_dataset(staging, args.out)
    print(f"{args.out}: {meta['num_examples']} examples, {meta['num_tokens']} tokens; {dict(counts)}")


if __name__ == "__main__":
    run_cli(main, "python -m data.tulu")
