"""Dolma v1.7 text (or any documents) as a "tokens" dataset for diffusion adaptation (METHOD.md §7).

    python -m data.dolma --tokenizer mistralai/Mistral-7B-v0.1 --out out/dolma --num-files 4
    python -m data.dolma --tokenizer out/shakespeare --input docs/*.jsonl.gz --out out/docs --max-tokens 10000000

Each document's "text" (--text-field) is tokenized as BOS + text + EOS, as the released tokenizer
(add_eos_token=True) did before packing. Each input file becomes one shard, tokens_NNNNN.bin; a
file without a single non-empty text is an error that names the field. Resumable per input file:
OUT/progress.json (written atomically after each file) records the finished ones with what they
held, so a re-run with the same tokenizer and --text-field goes on after them, as long as they are
the first of its inputs, unchanged; any other run starts the dataset again. meta.json is rewritten
at the end to cover every finished shard. --max-tokens stops after the document that reaches it
(that file's shard is kept, marked partial in progress.json, and not continued by a later run with a
larger cap: the next run goes on with the next file). One run at a time writes to --out.

From the Hub: the files of --dataset that match --files are sorted by name and the first
--num-files are downloaded into the Hugging Face cache. The default repo, emozilla/dolma-v1_7-305B
(a ~305B-token sample of Dolma v1.7), was not inspected from here: the default glob takes any
.json.gz, .jsonl(.gz) or .parquet file; pass --files to choose. Parquet needs `pip install pyarrow`.
"""

import itertools
from collections import Counter
from pathlib import Path

from data.shards import ArrayFile, dataset_done, finish_tokens, replace_dataset, token_dtype
from data.sources import input_files, positive, prepare_parser, read_records, run_key
from support.cli import OutputFolder, atomic_write, file_identity, read_marker, run_cli
from support.tokenizer import Tokenizer


def documents(path, text_field, seen):
    """The non-empty text_field strings of a file's records; seen counts the records and documents
    and keeps the first record's fields (for the message when there is no document)."""
    for record in read_records(path):
        seen["records"] += 1
        if seen["records"] == 1:
            seen["fields"] = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        text = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            seen["documents"] += 1
            yield text


def tokenize_file(tok, path, shard, text_field, budget, chunk=256):
    """Appends the documents of one file to shard; returns False if the token budget ran out first.
    A file without a document is an error that names the field."""
    seen = Counter()
    docs = documents(path, text_field, seen)
    while batch := list(itertools.islice(docs, chunk)):
        for ids in tok.encode_batch(batch):
            shard.append([tok.bos_id] + ids + [tok.eos_id])
            if budget is not None and shard.count >= budget:
                return False
    if not seen["records"]:
        raise ValueError(f"{path} holds no records: remove it from --input, or fill it")
    if not seen["documents"]:
        raise ValueError(f"{path}: none of its {seen['records']} records has a non-empty string {text_field!r} "
                         f"(the first record's fields: {seen['fields'] or 'none'}): pass --text-field with the "
                         "field that holds the text")
    return True


def resumable(progress, settings_key, files):
    """Whether progress.json is this run's: the same settings, and its finished files the first of
    this run's files, holding what they held then."""
    done = list(progress.get("done", {}).items()) if progress.get("settings") == settings_key else None
    return done is not None and len(done) <= len(files) and all(
        name == file_name and entry.get("identity") == file_identity(path)
        for (name, entry), (file_name, path) in zip(done, files))


def workplace(folder, settings_key, files, tok):
    """(the folder to tokenize into, its progress): --out itself to continue this run's progress, or to
    start where no finished dataset is; else a staging folder, so that another run's dataset stays whole
    until this one is complete (a staging folder is not resumed: a run killed in it starts again)."""
    out = Path(folder.path)
    progress = read_marker(out, "progress.json") or {}
    if resumable(progress, settings_key, files):
        return out, progress
    fresh = {"settings": settings_key, "tokenizer": tok.name, "done": {}}
    if dataset_done(out):
        return Path(folder.staging("dataset")), fresh
    for name in [*(d["shard"] for d in progress.get("done", {}).values()), "progress.json"]:
        if (out / name).exists():  # what a run with other inputs or settings left unfinished
            (out / name).unlink()
    return out, fresh


def main(argv=None):
    p = prepare_parser(__doc__, prog="python -m data.dolma", out="out/dolma", dataset="emozilla/dolma-v1_7-305B", files="*")
    p.add_argument("--num-files", type=positive, default=1, help="how many Hub files to use (the first by name)")
    p.add_argument("--text-field", default="text", help="the field of each record that holds the document")
    p.add_argument("--max-tokens", type=positive, help="stop once the dataset has this many tokens")
    args = p.parse_args(argv)

    out = Path(args.out)
    tok = Tokenizer(args.tokenizer)
    files, source = input_files(args, limit=args.num_files)  # [(name recorded in progress.json, local path)]
    if not args.input:
        source["num_files"] = args.num_files
    settings_key = run_key(tok, [], dict(text_field=args.text_field))
    key = run_key(tok, files, dict(text_field=args.text_field, max_tokens=args.max_tokens))
    with OutputFolder(out, "--out") as folder:
        if dataset_done(out, key):
            print(f"{out} is already prepared: nothing to do")
            return
        work, progress = workplace(folder, settings_key, files, tok)
        prepare(tok, files, work, progress, args)
        done = progress["done"].values()
        meta = finish_tokens(work, dict(tok.meta(), source=source, inputs=list(progress["done"]), fingerprint=key),
                             [d["shard"] for d in done], {d["shard"]: {"dtype": d["dtype"], "count": d["count"]}
                                                          for d in done})
        if work != out:  # the other run's progress.json goes first: no run may resume from it over these shards
            (out / "progress.json").unlink(missing_ok=True)
            replace_dataset(work, out)
    print(f"{out}: {meta['num_tokens']} tokens in {len(meta['shards'])} shards")


def prepare(tok, files, out, progress, args):
    """Tokenizes the files progress does not list yet into one shard each in out, recording each in
    out/progress.json."""
    total = sum(d["count"] for d in progress["done"].values())
    for name, path in files:
        if name in progress["done"]:
            continue
        if args.max_tokens is not None and total >= args.max_tokens:
            break
        shard = ArrayFile(out, f"tokens_{len(progress['done']):05d}.bin", token_dtype(tok.vocab_size))
        budget = None if args.max_tokens is None else args.max_tokens - total
        complete = tokenize_file(tok, path, shard, args.text_field, budget)
        progress["done"][name] = dict(shard.commit(), shard=shard.name, complete=complete,
                                      identity=file_identity(path))
        atomic_write(out / "progress.json", progress)
        total += shard.count
        print(f"{name}: {shard.count} tokens{'' if complete else ' (stopped at --max-tokens)'}; {total} in all")


if __name__ == "__main__":
    run_cli(main, "python -m data.dolma")
