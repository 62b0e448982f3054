"""
What every script shares: flags that declare their range, writing files atomically, output folders
kept by train.py's rules, and a user's mistake reported as one line.

    from support.cli import ArgumentParser, OutputFolder, atomic_write, number, run_cli, seed_flag
    p = ArgumentParser(prog="python -m data.tulu")
    p.add_argument("--limit", type=number(int, lo=1))       # --limit 0: one line, exit status 2
    p.add_argument("--top-p", type=number(float, lo=0, hi=1, lo_open=True))
    if __name__ == "__main__":
        run_cli(main, "python -m data.tulu")

An output folder (OutputFolder) follows the rules of train.py's run folder: everything is checked
before the folder is created, so a refused run writes nothing; one writer at a time (its .lock);
results are written atomically (atomic_write, or a staging folder moved in as one set); a result
carries the fingerprint of what produced it (the inputs' identities and every setting), so the
same run finds it done or resumes, and any other run computes it again.
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import traceback

# A user's mistake surfaces as one of these; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
INT_LIMIT = 2**63  # every whole number a flag takes fits an int64 (torch, numpy)
HASHED_BYTES = 2**24  # file_identity reads files up to this size; larger ones count by size and time


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
# Flags


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a bad flag reported as one line, `prog: error: --flag must be ..., got X`,
    and exit status 2 (argparse's own error() prints the whole usage first). The description is
    shown as written (module docstrings are laid out by hand)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # argparse says "argument --a/--b: must be ..."; a range type's message reads better as "--b must be ..."
        m = re.fullmatch(r"argument (?:\S+/)?(\S+): (must .*)", message, re.S)
        print(f"{self.prog}: error: {m.group(1) + ' ' + m.group(2) if m else message}", file=sys.stderr)
        raise SystemExit(2)


def _show(x) -> str:
    return "2**63" if x == INT_LIMIT else f"{x:g}" if isinstance(x, float) else str(x)


def describe(kind, lo=None, hi=None, lo_open=False, hi_open=False) -> str:
    """The range in words: "a positive integer", "a finite number > 0", "a number in (0, 1]"."""
    if kind is int and hi is None and not lo_open and lo in (0, 1):
        return "a positive integer" if lo == 1 else "0 or a positive integer"
    name = "a whole number" if kind is int else "a finite number"
    if lo is not None and hi is not None:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        return f"{name.replace('finite ', '')} in {left}{_show(lo)}, {_show(hi)}{right}"
    if lo is not None:
        return f"{name} {'>' if lo_open else '>='} {_show(lo)}"
    return f"{name} {'<' if hi_open else '<='} {_show(hi)}" if hi is not None else name


def _parse(kind, text: str):
    """The int or float a flag's text holds, or None: a finite number, and for int a whole one (which
    may be written 1e3)."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or kind is float:
        return value if math.isfinite(value) else None
    try:
        return int(text)  # exact, however many digits
    except ValueError:
        return int(value) if value.is_integer() else None


def number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type for a number in a declared range, checked when the flags are parsed:
    number(int, lo=1), number(float, lo=0, hi=1, lo_open=True). Floats must be finite; whole numbers
    must fit an int64 (below 2**63) whatever the range says, so --steps 1e20 is refused, not a crash."""
    def check(value):
        return not ((lo is not None and (value <= lo if lo_open else value < lo))
                    or (hi is not None and (value >= hi if hi_open else value > hi))
                    or (kind is int and not -INT_LIMIT <= value < INT_LIMIT))

    def parse(text):
        value = _parse(kind, text)
        if value is None or not check(value):
            too_big = kind is int and value is not None and value >= INT_LIMIT and hi is None
            shown = text if text.strip() else repr(text)
            raise argparse.ArgumentTypeError(
                f"must be {describe(kind, lo, hi, lo_open, hi_open)}{' below 2**63' if too_big else ''}, got {shown}")
        return value
    return parse


def number_list(kind, **bounds):
    """An argparse type for "10,50,100": a non-empty list of numbers, each in number()'s range."""
    one = number(kind, **bounds)

    def parse(text):
        try:
            values = [one(v.strip()) for v in text.split(",") if v.strip()]
        except argparse.ArgumentTypeError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"must be {describe(kind, **bounds)}, or several separated by "
                                             f"commas, got {text if text.strip() else repr(text)}")
        return values
    return parse


seed_flag = number(int, lo=0, hi=INT_LIMIT, hi_open=True)  # the argparse type of --seed: [0, 2**63)
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: logits are float32 (or narrower)


def eta_flag(text: str) -> float:
    """The argparse type of --eta, a guidance step size: a finite number >= 0 that float32 holds (a
    larger one makes the guided logits infinite)."""
    value = number(float, lo=0)(text)
    if value > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}, over float32's largest "
                                         "(3.4e+38), which the logits are")
    return value


# -----------------------------------------------------------------------------
# Output folders


def fingerprint(*parts) -> str:
    """sha256 of the parts as JSON: the identity of what produced a result (settings, input identities)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path) -> dict:
    """What a file or folder holds, cheaply: each file's name, size and sha256 (files up to 16 MiB) or
    modification time (larger ones: hashing gigabytes of weights would take minutes; replacing or
    editing a file changes its time). Folders: every file below, hidden ones (.lock) left out."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(os.path.relpath(os.path.join(d, f), path) for d, dirs, files in os.walk(path)
                       for f in files if not f.startswith("."))
        return {name: file_identity(os.path.join(path, name)) for name in names if ".tmp-" not in name}
    st = os.stat(path)
    if st.st_size > HASHED_BYTES:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with open(path, "rb") as f:
        return {"size": st.st_size, "sha256": hashlib.sha256(f.read()).hexdigest()}


def read_marker(path, name):
    """The JSON object in PATH/NAME, or None if it is missing or unreadable (then nothing is done there)."""
    try:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


class OutputFolder:
    """A tool's output folder for the length of one run, by train.py's rules (its run folder's lock is
    reused, not copied): entering takes PATH/.lock (creating PATH) and removes what killed runs left
    (.tmp-* files and folders); leaving after an error removes this run's staging, and PATH itself if
    this run created it and committed nothing. Check every flag and input before entering.

        with OutputFolder(args.out, "--out") as out:
            if out.done("meta.json", key): ...     # the same run finished before
            staging = out.staging("build")        # write here, then move it in as one set"""

    def __init__(self, path, flag: str):
        self.path, self.flag = os.fspath(path), flag

    def __enter__(self):
        from support.run_folder import clean, lock  # run_folder imports the model: loaded only when needed
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"{self.flag} {self.path} is a file: give a folder")
        self.created = not os.path.exists(self.path)
        self.handle = lock(self.path, self.flag)  # its messages name this tool's flag
        clean(self.path)
        return self

    def __exit__(self, kind, error, tb):
        from support.run_folder import clean
        try:
            if kind is not None:
                clean(self.path)
                if self.created and set(os.listdir(self.path)) <= {".lock"}:
                    shutil.rmtree(self.path)
        finally:
            self.handle.close()
        return False

    def done(self, marker: str, key: str) -> bool:
        """Whether PATH/MARKER records the fingerprint `key`: the same run finished here before."""
        found = read_marker(self.path, marker)
        return found is not None and found.get("fingerprint") == key

    def staging(self, name: str) -> str:
        """An empty folder PATH/.tmp-NAME to build a result in (removed if the run fails)."""
        folder = os.path.join(self.path, f".tmp-{name}")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        return folder


def replace_files(staging, target, marker: str, old=()):
    """Moves every file (or folder) of `staging` into `target` as one set. The marker (the file that
    says the result is complete, e.g. meta.json) goes first, then the `old` files and folders of the
    previous result, then the new ones come in and the new marker last: a reader finds the old result,
    no result, or the new one, never a mix of two runs. `staging` is removed."""
    os.makedirs(target, exist_ok=True)
    for name in [marker, *old]:
        _remove(os.path.join(target, name))
    for name in sorted(os.listdir(staging), key=lambda n: n == marker):
        if os.path.isdir(os.path.join(target, name)):  # os.replace puts a file over a file, not a folder
            _remove(os.path.join(target, name))
        os.replace(os.path.join(staging, name), os.path.join(target, name))
    os.rmdir(staging)


def _remove(path):
    """Deletes a file or a folder (and what it holds), if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
