"""Preference pairs as a "pairs" dataset for the reward model (SPEC 10).

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

import argparse
import itertools
from collections import Counter

from data.chat import encode_examples, first_turn, load_tokenizer
from data.shards import dataset_done, write_pairs
from data.sources import hub_files, local_files, read_records


def preference(record):
    """(prompt, chosen response, rejected response) of one record, or None."""
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json, or a Hub model id")
    p.add_argument("--out", default="out/preferences", help="output dataset folder")
    p.add_argument("--input", nargs="+",
                   help="local .jsonl/.json/.parquet files (or folders, globs) instead of the Hub")
    p.add_argument("--dataset", default="HuggingFaceH4/ultrafeedback_binarized", help="Hub dataset id")
    p.add_argument("--files", default="data/train_prefs-*.parquet", help="glob of the Hub dataset's files to read")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--limit", type=int, help="stop after this many records (for quick experiments)")
    args = p.parse_args(argv)

    tok = load_tokenizer(args.tokenizer)
    if dataset_done(args.out, tok.meta()):
        print(f"{args.out} is already prepared: nothing to do")
        return
    if args.input:
        files = local_files(args.input)
        source = {"input": [str(f) for f in files]}
    else:
        files = [f for _, f in hub_files(args.dataset, args.files, revision=args.revision)]
        source = {"dataset": args.dataset, "files": args.files, "revision": args.revision}
    records = itertools.islice((r for f in files for r in read_records(f)), args.limit)
    counts = Counter()  # filled in while the pairs stream into the writer, saved in meta.json
    pairs = encoded_pairs(tok, usable(records, counts))
    meta = write_pairs(args.out, pairs, dict(tok.meta(), source=source, counts=counts))
    print(f"{args.out}: {meta['num_examples']} pairs, {meta['num_tokens']} tokens; {dict(counts)}")


if __name__ == "__main__":
    main()
