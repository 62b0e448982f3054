"""
What every script shares: writing files atomically and reporting a user's mistake as one line.

    from support.cli import atomic_write, run_cli
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
