"""Preference pairs as a "pairs" dataset for the reward model (METHOD.md §10).

    python -m data.preferences --tokenizer out/shakespeare --input out/shakespeare/rm_val.jsonl --out out/prefs
    python -m data.preferences --tokenizer mistralai/Mistral-7B-v0.1 --out out/ultrafeedback

Records are {"prompt": str, "chosen": str, "rejected": str}, or UltraFeedback-binarized style where
"chosen" and "rejected" are message lists [{"role": "user", ...}, {"role": "assistant", ...}, ...]
(the first user message is the prompt, the first assistant reply the response). Both sequences
are BOS + the templated prompt + the response + EOS (data/chat.py). Skipped and counted in
meta.json: records in neither format, and pairs whose two responses are the same text. A run that
keeps no pair is an error that names what the records lack.

The Hub default is HuggingFaceH4/ultrafeedback_binarized, files data/train_prefs-*.parquet;
reading parquet needs `pip install pyarrow`. The dataset is built beside --out and moved in when
complete; one run at a time. A re-run with the same inputs and flags does nothing; any other run
prepares the dataset again.
"""

import itertools
from collections import Counter

from data.chat import encode_examples, first_turn
from data.shards import dataset_done, replace_dataset, write_pairs
from data.sources import input_files, positive, prepare_parser, read_records, run_key
from support.cli import OutputFolder, run_cli
from support.tokenizer import Tokenizer

FIELDS = ("prompt", "chosen", "rejected")


def preference(record):
    """(prompt, chosen response, rejected response) of one record; ValueError says what it lacks."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = first_turn({"messages": chosen}), first_turn({"messages": rejected})
        if c and r:
            return c[0], c[1], r[1]
        raise ValueError('its "chosen" and "rejected" message lists need a user message, then an assistant reply')
    missing = [name for name in FIELDS if not isinstance(record.get(name), str)]
    if missing:
        raise ValueError(f"no {' or '.join(repr(m) for m in missing)} string (its fields: "
                         f"{', '.join(map(str, record)) or 'none'})")
    return record["prompt"], chosen, rejected


def numbered(files):
    """("FILE, record N", record) for every record of the files, in order."""
    for _, path in files:
        for n, record in enumerate(read_records(path), 1):
            yield f"{path}, record {n}", record


def usable(records, counts, problems):
    """The (prompt, chosen, rejected) triples worth training on; the others are counted, and the first
    one's reason kept."""
    for where, record in records:
        try:
            triple = preference(record)
        except ValueError as e:
            counts["skipped_format"] += 1
            if not problems:
                problems.append(f"{where}: {e}")
            continue
        if triple[1].strip() == triple[2].strip():
            counts["skipped_same_response"] += 1
        else:
            yield triple


def encoded_pairs(tok, triples, chunk=512):
    """(chosen_ids, rejected_ids, prompt_len) for each triple, tokenized a chunk at a time."""
    triples = iter(triples)
    while batch := list(itertools.islice(triples, chunk)):
        chosen = encode_examples(tok, [(q, c) for q, c, _ in batch])
        rejected = encode_examples(tok, [(q, r) for q, _, r in batch])
        for (c, prompt_len), (r, _) in zip(chosen, rejected):
            yield c, r, prompt_len


def why_empty(counts, problems):
    """The message for a run that kept no pair."""
    if problems:
        return (f"no usable preference pair among {sum(counts.values())} records; the first: {problems[0]}. "
                'A record needs "prompt", "chosen" and "rejected" strings, or "chosen" and "rejected" message lists')
    if counts["skipped_same_response"]:
        return f"every pair's two responses are the same text ({counts['skipped_same_response']} records)"
    return "the input holds no records"


def main(argv=None):
    p = prepare_parser(__doc__, prog="python -m data.preferences", out="out/preferences",
                       dataset="HuggingFaceH4/ultrafeedback_binarized", files="data/train_prefs-*.parquet")
    p.add_argument("--limit", type=positive, help="stop after this many records (for quick experiments)")
    args = p.parse_args(argv)

    tok = Tokenizer(args.tokenizer)
    files, source = input_files(args)
    key = run_key(tok, files, dict(limit=args.limit))
    with OutputFolder(args.out, "--out") as out:
        if dataset_done(args.out, key):
            print(f"{args.out} is already prepared: nothing to do")
            return
        counts, problems = Counter(), []  # filled in while the pairs stream into the writer, saved in meta.json
        triples = usable(itertools.islice(numbered(files), args.limit), counts, problems)
        staging = out.staging("dataset")
        meta = write_pairs(staging, encoded_pairs(tok, triples),
                           dict(tok.meta(), source=source, counts=counts, fingerprint=key))
        if meta["num_examples"] == 0:
            raise ValueError(why_empty(counts, problems))
        replace_dataset(staging, args.out)
    print(f"{args.out}: {meta['num_examples']} pairs, {meta['num_tokens']} tokens; {dict(counts)}")

if __name__ == "__main__":
    run_cli(main, "python -m data.preferences")
