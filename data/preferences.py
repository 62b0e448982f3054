"""Preference pairs as a "pairs" dataset for the reward model (METHOD.md §10).

    python -m data.preferences --tokenizer out/shakespeare --input out/shakespeare/rm_val.jsonl --out out/prefs
    python -m data.preferences --tokenizer mistralai/Mistral-7B-v0.1 --out out/ultrafeedback

Records are {"prompt": str, "chosen": str, "rejected": str}, or UltraFeedback-binarized style where
"chosen" and "rejected" are message lists [{"role": "user", ...}, {"role": "assistant", ...}, ...]
(the first user message is the prompt, the first assistant reply the response). Both sequences
are BOS + the templated prompt + the response + EOS (data/chat.py). Skipped and counted in
meta.json: records in neither format, and pairs whose two responses are the same text.

The Hub default is HuggingFaceH4/ultrafeedback_binarized, files data/train_prefs-*.parquet;
reading parquet needs `pip install pyarrow`. Re-running after a finished run does nothing.
"""

import itertools
from collections import Counter

from support.cli import run_cli
from data.chat import encode_examples, first_turn
from data.shards import dataset_done, write_pairs
from data.sources import input_files, positive, prepare_parser, read_records
from support.tokenizer import Tokenizer


def preference(record):
    """(prompt, chosen response, rejected response) of one record, or None."""
    if not isinstance(record, dict):
        return None
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str):
        return prompt, chosen, rejected
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = first_turn({"messages": chosen}), first_turn({"messages": rejected})
        if c and r:
            return c[0], c[1], r[1]
    return None


def usable(records, counts):
    """The (prompt, chosen, rejected) triples worth training on, counting the others."""
    for record in records:
        triple = preference(record)
        if triple is None:
            counts["skipped_format"] += 1
        elif triple[1].strip() == triple[2].strip():
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


def main(argv=None):
    p = prepare_parser(__doc__, prog="python -m data.preferences", out="out/preferences", dataset="HuggingFaceH4/ultrafeedback_binarized",
                       files="data/train_prefs-*.parquet")
    p.add_argument("--limit", type=positive, help="stop after this many records (for quick experiments)")
    args = p.parse_args(argv)

    tok = Tokenizer(args.tokenizer)
    if dataset_done(args.out, tok.meta()):
        print(f"{args.out} is already prepared: nothing to do")
        return
    files, source = input_files(args)
    records = itertools.islice((r for _, f in files for r in read_records(f)), args.limit)
    counts = Counter()  # filled in while the pairs stream into the writer, saved in meta.json
    pairs = encoded_pairs(tok, usable(records, counts))
    meta = write_pairs(args.out, pairs, dict(tok.meta(), source=source, counts=counts))
    print(f"{args.out}: {meta['num_examples']} pairs, {meta['num_tokens']} tokens; {dict(counts)}")


if __name__ == "__main__":
    run_cli(main, "python -m data.preferences")
