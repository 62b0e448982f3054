"""The Tulu 2 SFT mixture as a "spans" dataset for instruction tuning (METHOD.md §8).

    python -m data.tulu --tokenizer mistralai/Mistral-7B-v0.1 --out out/tulu
    python -m data.tulu --tokenizer out/shakespeare --input chats.jsonl --out out/chats

Single-turn only: the first user message and the first assistant reply of each conversation
(a leading system message is dropped), formatted with the Tulu template of data/chat.py.
Records are {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
(Tulu's format) or {"user": ..., "assistant": ...}. Skipped and counted in meta.json: records
without such a first exchange, and examples whose prompt alone is >= --max-len tokens (no room
left for a response).

From the Hub: allenai/tulu-v2-sft-mixture holds its ~326k conversations as three parquet files
(data/train-0000N-of-00003-*.parquet); reading parquet needs `pip install pyarrow`, which tess2
does not install. Re-running after a finished run does nothing.
"""

import itertools
from collections import Counter

from support.cli import run_cli
from data.chat import encode_examples, first_turn
from data.shards import dataset_done, write_spans
from data.sources import input_files, positive, prepare_parser, read_records
from support.tokenizer import Tokenizer


def conversations(files, counts):
    """(user, assistant) of every record, counting the ones without a first exchange."""
    for _, path in files:
        for record in read_records(path):
            turn = first_turn(record)
            if turn is None:
                counts["skipped_no_first_turn"] += 1
            else:
                yield turn


def encoded(tok, turns, max_len, counts, chunk=1024):
    """(ids, prompt_len) for each (user, assistant), tokenized a chunk at a time."""
    turns = iter(turns)
    while batch := list(itertools.islice(turns, chunk)):
        for ids, prompt_len in encode_examples(tok, batch):
            if prompt_len >= max_len:
                counts["skipped_long_prompt"] += 1
                continue
            yield ids, prompt_len


def main(argv=None):
    p = prepare_parser(__doc__, prog="python -m data.tulu", out="out/tulu", dataset="allenai/tulu-v2-sft-mixture", files="data/*.parquet")
    p.add_argument("--max-len", type=positive, default=2048, help="skip examples whose prompt alone is this long")
    p.add_argument("--limit", type=positive, help="stop after this many conversations (for quick experiments)")
    args = p.parse_args(argv)

    tok = Tokenizer(args.tokenizer)
    if dataset_done(args.out, tok.meta()):
        print(f"{args.out} is already prepared: nothing to do")
        return
    files, source = input_files(args)
    counts = Counter()  # filled in while the examples stream into the writer, saved in meta.json
    turns = itertools.islice(conversations(files, counts), args.limit)
    examples = encoded(tok, turns, args.max_len, counts)
    meta = write_spans(args.out, examples, dict(tok.meta(), source=source, max_len=args.max_len, counts=counts))
    print(f"{args.out}: {meta['num_examples']} examples, {meta['num_tokens']} tokens; {dict(counts)}")


if __name__ == "__main__":
    run_cli(main, "python -m data.tulu")
