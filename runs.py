"""
The run folder (train.py's --out): one trainer at a time, nothing left behind by an interruption,
and the checkpoint a --resume continues from, with one coherent log.

  RUN/.lock             flock'ed by the trainer for its whole life (pid and host inside); the OS
                        releases it when the process dies, however it dies, so no lock goes stale
  RUN/step-XXXXXXX/     checkpoints (model.save_pretrained: built under .tmp-*, then renamed in)
  RUN/log.jsonl         one JSON record per line; cut back to the step a run resumes from
  RUN/discarded-*/      checkpoints moved aside by --discard-later or --fallback (never deleted)
"""
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from common import atomic_write

STEP = re.compile(r"step-(\d{7})")


def lock(out):
    """Takes RUN/.lock (creating RUN) for as long as the returned file stays open. A second trainer on
    the same folder stops at once, told who holds it."""
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise OSError(f"cannot write to --out {out} ({e.strerror}): choose a folder you can write to") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its pid yet"
        f.close()
        raise ValueError(f"{out} is in use by another trainer ({holder}): wait for it to end or stop it, "
                         "or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def checkpoints(out):
    """The step-XXXXXXX folders of a run, oldest first."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return [os.path.join(out, d) for d in sorted(d for d in names if STEP.fullmatch(d))]


def step_of(path):
    m = STEP.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def clean(out):
    """Removes what interrupted saves left: save_pretrained's `.tmp-NAME-*` folders, pruned checkpoints
    being deleted (`.old-*`) and atomic_write's `.tmp-*` files. One case is a checkpoint, not debris:
    killed between its two renames, save_pretrained leaves NAME absent, the finished new folder
    `.tmp-NAME-x` and the previous one `.tmp-NAME-x-old`; the new one (else the old) is put back."""
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        m = re.fullmatch(r"\.tmp-(step-\d{7})-.+-old", name)
        if m and not os.path.exists(os.path.join(out, m.group(1))):
            new = os.path.join(out, name[:-len("-old")])
            os.rename(new if os.path.isdir(new) else os.path.join(out, name), os.path.join(out, m.group(1)))
    for name in os.listdir(out):
        if name.startswith((".tmp-", ".old-")):
            _remove(os.path.join(out, name))


def discard(path):
    """Deletes a checkpoint: renamed away first, so that no half-deleted one is ever seen under its name."""
    trash = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(path))
    os.rename(path, os.path.join(trash, "x"))
    shutil.rmtree(trash)


def prune(out, keep_last):
    for old in checkpoints(out)[:-keep_last] if keep_last else []:
        discard(old)


def move_aside(paths, out):
    """Moves checkpoints into RUN/discarded-<time>/, out of --resume's sight; returns that folder."""
    aside = os.path.join(out, time.strftime("discarded-%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    for p in paths:
        os.rename(p, os.path.join(aside, os.path.basename(p)))
    return aside


def problem(path):
    """None if the checkpoint at `path` can be read, else which file is unreadable and why. Cheap: JSON
    files, safetensors headers (they also catch a truncated file) and train_state.pt memory-mapped."""
    if not os.path.isdir(path):
        return f"{path} is not a folder"
    for name in ("config.json", "train_state.json"):
        try:
            json.loads(Path(path, name).read_text())
        except (OSError, ValueError) as e:
            return f"{os.path.join(path, name)} is unreadable ({e})"
    weights = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for name in weights or ["model.safetensors"]:
        try:
            with safe_open(os.path.join(path, name), "pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a bad header
            return f"{os.path.join(path, name)} is unreadable ({e})"
    try:
        torch.load(os.path.join(path, "train_state.pt"), weights_only=True, mmap=True)
    except Exception as e:  # a truncated zip, a bad pickle, a missing file
        return f"{os.path.join(path, 'train_state.pt')} is unreadable ({type(e).__name__}: {e})"
    return None


def resume_point(out, resume, fallback=False, discard_later=False):
    """The checkpoint folder to continue from (None: start from --init), after making --out one history:
    later checkpoints than it are moved aside (--discard-later), unreadable latest ones too (--fallback)."""
    found = checkpoints(out)
    if not resume:
        if found:
            raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or another --out")
        return None
    candidates = found[::-1] if resume == "latest" else [resume]
    if not candidates:
        print(f"--resume: no checkpoint in {out} yet; starting from --init", flush=True)
        return None
    bad = []
    for path in candidates:
        if (why := problem(path)) is None:
            break
        bad.append((path, why))
    else:
        raise ValueError(f"no readable checkpoint to resume from: {bad[0][1]}")
    if bad and not fallback:
        raise ValueError(f"{bad[0][1]}: pass --fallback to resume from {path}, the latest readable checkpoint "
                         f"(the unreadable ones are moved aside, not deleted), or repair the file")
    later = [p for p in found if step_of(p) > step_of(path)]
    unreadable = [p for p, _ in bad]
    if later and not discard_later and sorted(later) != sorted(unreadable):
        raise ValueError(f"--resume {path}: {out} has later checkpoints ({', '.join(map(os.path.basename, later))}); "
                         "continuing from here would leave them as an abandoned second history. Pass "
                         "--discard-later to move them aside (into a discarded-* folder), or resume from the latest")
    if later:
        for p, why in bad:
            print(f"warning: {why}; resuming from {path} instead (--fallback)", flush=True)
        print(f"moved {', '.join(map(os.path.basename, later))} aside into {move_aside(later, out)}", flush=True)
    return path


def cut_log(path, step):
    """Keeps log.jsonl's records up to `step`, so that a resumed run extends one history. A torn last
    line (the process killed while writing it) is dropped with a warning; a bad line elsewhere is an error."""
    if not os.path.exists(path):
        return
    lines = Path(path).read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1} is not JSON: repair or delete that line, then --resume "
                                 "again") from None
            print(f"warning: {path}: dropped a torn last line (a run was stopped while writing it)", flush=True)
            break
        if record["step"] <= step:
            kept.append(line + "\n")
    atomic_write(path, "".join(kept))
