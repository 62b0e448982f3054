"""Dolma v1.7 text (or any documents) as a "tokens" dataset for diffusion adaptation (METHOD.md §7).

    python -m data.dolma --tokenizer mistralai/Mistral-7B-v0.1 --out out/dolma --num-files 4
    python -m data.dolma --tokenizer out/shakespeare --input docs/*.jsonl.gz --out out/docs --max-tokens 10000000

Each document's "text" (--text-field) is tokenized as BOS + text + EOS, as the released tokenizer
(add_eos_token=True) did before packing. Each input file becomes one
shard, tokens_NNNNN.bin. Resumable per input file: OUT/progress.json (written atomically after each
file) records the finished ones, so a re-run skips them and goes on with the rest; meta.json is
rewritten at the end to cover every finished shard. --max-tokens stops after the document that
reaches it (that file's shard is kept, marked partial in progress.json, and not continued by a
later run with a larger cap: the next run goes on with the next file).

From the Hub: the files of --dataset that match --files are sorted by name and the first
--num-files are downloaded into the Hugging Face cache. The default repo, emozilla/dolma-v1_7-305B
(a ~305B-token sample of Dolma v1.7), was not inspected from here: the default glob takes any
.json.gz, .jsonl(.gz) or .parquet file; pass --files to choose. Parquet needs `pip install pyarrow`.
"""

import itertools
import json
from pathlib import Path

from support.cli import atomic_write, run_cli
from data.shards import ArrayFile, finish_tokens, token_dtype
from data.sources import input_files, positive, prepare_parser, read_records
from support.tokenizer import Tokenizer


def documents(path, text_field):
    for record in read_records(path):
        text = record.get(text_field)
        if isinstance(text, str) and text.strip():
            yield text


def tokenize_file(tok, path, shard, text_field, budget, chunk=256):
    """Appends the documents of one file to shard; returns False if the token budget ran out first."""
    docs = documents(path, text_field)
    while batch := list(itertools.islice(docs, chunk)):
        for ids in tok.encode_batch(batch):
            shard.append([tok.bos_id] + ids + [tok.eos_id])
            if budget is not None and shard.count >= budget:
                return False
    return True


def main(argv=None):
    p = prepare_parser(__doc__, prog="python -m data.dolma", out="out/dolma", dataset="emozilla/dolma-v1_7-305B", files="*")
    p.add_argument("--num-files", type=positive, default=1, help="how many Hub files to use (the first by name)")
    p.add_argument("--text-field", default="text", help="the field of each record that holds the document")
    p.add_argument("--max-tokens", type=positive, help="stop once the dataset has this many tokens")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(args.tokenizer)
    progress_path = out / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {"done": {}}
    if progress.get("vocab_sha256", tok.vocab_sha256) != tok.vocab_sha256:
        raise ValueError(f"{out} was started with another tokenizer ({progress.get('tokenizer')}): "
                         "delete it or choose another --out")
    progress.update(tokenizer=tok.name, vocab_sha256=tok.vocab_sha256)

    files, source = input_files(args, limit=args.num_files)  # [(name recorded in progress.json, local path)]
    if not args.input:
        source["num_files"] = args.num_files

    total = sum(d["count"] for d in progress["done"].values())
    for name, path in files:
        if name in progress["done"]:
            continue
        if args.max_tokens is not None and total >= args.max_tokens:
            break
        shard = ArrayFile(out, f"tokens_{len(progress['done']):05d}.bin", token_dtype(tok.vocab_size))
        budget = None if args.max_tokens is None else args.max_tokens - total
        complete = tokenize_file(tok, path, shard, args.text_field, budget)
        progress["done"][name] = dict(shard.commit(), shard=shard.name, complete=complete)
        atomic_write(progress_path, progress)
        total += shard.count
        print(f"{name}: {shard.count} tokens{'' if complete else ' (stopped at --max-tokens)'}; {total} in all")

    done = progress["done"].values()
    shards = [d["shard"] for d in done]
    files_meta = {d["shard"]: {"dtype": d["dtype"], "count": d["count"]} for d in done}
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("shards") == shards:
        print(f"{out} is already prepared: nothing to do")
        return
    meta = finish_tokens(out, dict(tok.meta(), source=source, inputs=list(progress["done"])), shards, files_meta)
    print(f"{out}: {meta['num_tokens']} tokens in {len(shards)} shards")


if __name__ == "__main__":
    run_cli(main, "python -m data.dolma")
