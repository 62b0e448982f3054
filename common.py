"""
What every script shares: writing files atomically and reporting a user's mistake as one line.

    from common import atomic_write, run_cli
    if __name__ == "__main__":
        run_cli(main, "train.py")
"""
import json
import os
import sys
import tempfile
import traceback

# A user's mistake surfaces as one of these; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def atomic_write(path, data, mode: int = 0o644):
    """Write str, bytes or a JSON-able object (indented JSON) to `path` so that a reader sees the old
    file or the new one, never a part: a temporary file in the same folder, then os.replace."""
    path = os.fspath(path)
    if not isinstance(data, (str, bytes)):
        data = json.dumps(data, indent=2) + "\n"
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_cli(main, prog: str, argv=None):
    """Run an entry point's main(argv). A user's mistake (USER_ERRORS) ends as one line
    `prog: error: message` on stderr and exit status 2, not a traceback; set TESS2_DEBUG=1 to see
    the traceback (for a bug report). Ctrl-C ends with status 130 and no traceback."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        if os.environ.get("TESS2_DEBUG"):
            traceback.print_exc()
        message = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{message}: {e.filename}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


# -----------------------------------------------------------------------------
# Finding checkpoints and tokenizers, locally or on the Hugging Face Hub

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def is_hub_id(name: str) -> bool:
    """Whether name can be a Hub repo id ('owner/name') rather than a local path."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1 and not os.path.exists(name)


def hub_error(repo: str, e: Exception) -> FileNotFoundError:
    """One line for a failed Hub fetch (the library's own error runs to a hundred lines)."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return FileNotFoundError(f"{repo!r} is not a local directory and could not be fetched from the Hugging Face "
                             f"Hub ({type(e).__name__}: {first}); offline, pass a local checkpoint directory")


def resolve(name_or_path: str) -> str:
    """A local checkpoint directory, or a Hub repo id fetched (config, safetensors, tokenizer only)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path} is a file; pass the checkpoint directory that holds config.json")
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"no checkpoint directory {name_or_path!r} (and it is not a Hub repo id like "
                                "'hamishivi/tess2')")
    from huggingface_hub import snapshot_download
    try:  # offline (HF_HUB_OFFLINE=1 or no network) this returns the cached snapshot, if any
        return snapshot_download(name_or_path, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
            *TOKENIZER_FILES])
    except Exception as e:
        raise hub_error(name_or_path, e) from None


def read_json(path: str, what: str = "file"):
    """json.load with the file named in the error (a truncated config.json, say)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the {what} may be truncated or edited by hand; "
                         "restore it from its source") from None


def read_config(path: str) -> dict:
    """config.json of a checkpoint directory; a training run folder is named as such."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        runs = sorted(d for d in os.listdir(path) if d.startswith("step-")) if os.path.isdir(path) else []
        hint = f"; it looks like a training run folder: pass one of its checkpoints, e.g. {os.path.join(path, runs[-1])}" if runs else ""
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory{hint}")
    return read_json(file, "checkpoint's config.json")
