"""Where prepare scripts read from: local files or a Hub dataset repository.

read_records() yields dicts from .jsonl / .json / .parquet files (optionally .gz) and plain .txt
files (one document each, as {"text": ...}). hub_files() picks files of a Hub dataset by glob and
downloads them into the Hugging Face cache, so a second run does not download again.
prepare_parser() and input_files() are the flags the prepare scripts share and what they choose.
"""

import fnmatch
import glob
import gzip
import json
from pathlib import Path

from huggingface_hub import hf_hub_download, list_repo_files

from support.cli import ArgumentParser, file_identity, fingerprint, number

READABLE = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".txt", ".txt.gz")


def _open_text(path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_records(path):
    """Yields one dict per record of a local file."""
    name = Path(path).name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"reading {name} needs pyarrow, which tess2 does not install: `pip install pyarrow`, "
                              "or convert the file to .jsonl and pass it with --input") from None
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif name.endswith((".txt", ".txt.gz")):
        with _open_text(path) as f:
            yield {"text": f.read()}
    elif name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        with _open_text(path) as f:
            first = f.read(1)
            f.seek(0)
            if first == "[":  # a JSON array rather than JSON lines
                yield from json.load(f)
                return
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
    else:
        raise ValueError(f"cannot read {path}: expected one of {', '.join(READABLE)}")


def local_files(inputs):
    """--input arguments (files, folders, globs) -> sorted readable files."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and f.name.endswith(READABLE)]
        elif p.is_file():
            files.append(p)
        else:
            matches = [Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file()]
            if not matches:
                raise FileNotFoundError(f"--input {item}: no such file, folder or glob match")
            files += matches
    return sorted(set(files))


def hub_files(repo_id, pattern, limit=None, revision=None):
    """Downloads the readable files of Hub dataset repo_id that match the glob pattern (sorted by
    name, the first `limit` of them); returns [(name in the repo, local path in the HF cache)]."""
    try:
        names = sorted(f for f in list_repo_files(repo_id, repo_type="dataset", revision=revision)
                       if fnmatch.fnmatch(f, pattern) and f.endswith(READABLE))
    except Exception as e:
        raise ConnectionError(f"could not list Hub dataset {repo_id!r} ({type(e).__name__}: {e}). "
                              "Without network access, download its files elsewhere and pass them with --input."
                              ) from None
    if not names:
        raise FileNotFoundError(f"Hub dataset {repo_id!r} has no file matching {pattern!r}: pass another --files glob")
    return [(name, Path(hf_hub_download(repo_id, name, repo_type="dataset", revision=revision)))
            for name in names[:limit]]


positive = number(int, lo=1)  # an argparse type: an integer >= 1 (train.py's flags too)


def prepare_parser(doc, out, dataset, files, prog=None):
    """The flags of every prepare script: --tokenizer, --out, and --input (local files) or
    --dataset/--files/--revision (a Hub dataset)."""
    p = ArgumentParser(prog=prog, description=doc)
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json, or a Hub model id")
    p.add_argument("--out", default=out, help="output dataset folder")
    p.add_argument("--input", nargs="+", help="local .jsonl(.gz)/.json(.gz)/.parquet/.txt files (or folders, globs) "
                                              "instead of the Hub")
    p.add_argument("--dataset", default=dataset, help="Hub dataset id")
    p.add_argument("--files", default=files, help="glob of the Hub dataset's files to read (readable types only)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    return p


def input_files(args, limit=None):
    """[(name, local path)] of the files to read and the "source" meta.json records, from the flags of
    prepare_parser: the files --input names, or the first `limit` Hub files that match --files."""
    if args.input:
        files = [(str(f), f) for f in local_files(args.input)]
        if not files:
            raise FileNotFoundError(f"--input {' '.join(args.input)}: no readable file there (one of "
                                    f"{', '.join(READABLE)})")
        return files, {"input": [name for name, _ in files]}
    files = hub_files(args.dataset, args.files, limit=limit, revision=args.revision)
    return [(f"{args.dataset}/{name}", f) for name, f in files], {
        "dataset": args.dataset, "files": args.files, "revision": args.revision}



def run_key(tok, files, settings):
    """The fingerprint of a prepare run (support.cli.fingerprint): the tokenizer's files, what the input
    files hold, and every setting. The same key finds the run's dataset done; another key prepares again."""
    tokenizer = {k: v for k, v in tok.meta().items() if k != "tokenizer"}  # its contents, not the name it was given by
    return fingerprint(tokenizer, [file_identity(path) for _, path in files], settings)
