"""
The run folder (train.py's --out): one trainer at a time, nothing left behind by an interruption,
and the checkpoint a --resume continues from, with one coherent log.

  RUN/.lock             flock'ed by the trainer for its whole life (pid and host inside); the OS
                        releases it when the process dies, however it dies, so no lock goes stale
  RUN/step-XXXXXXX/     checkpoints (model.save_pretrained: built under .tmp-*, then swapped in)
  RUN/log.jsonl         one JSON record per line; cut back to the step a run resumes from
  RUN/discarded-*/      checkpoints moved aside by --discard-later or --fallback (never deleted)

A checkpoint is the Hugging Face layout (config.json, fp32 safetensors, tokenizer with [PAD];
generation_config.json for a diffusion model) plus train_state.pt (AdamW state; tensors and
primitives only, read with weights_only=True) and train_state.json (step, data position, the
dataset's identity, the run's flags). Reading the model a run starts from (--init, or the
checkpoint --resume continues) is here too: load_model.

A run checks everything (its flags, data, tokenizer, the checkpoint it starts from, the checkpoint
--resume picks) before RUN and its .lock are created: a refused run writes nothing (check_out,
resume_from); only then does it take the lock and make RUN one history (sole_trainer, begin). A
full disk, a read-only file system or a permission error while writing is one line naming the
path and what to do (write_fault); the checkpoints saved before stay whole.
"""
import errno
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from data.shards import check_tokenizer
from model import ModelArgs, Transformer, load_sharded
from support import lora
from support.cli import atomic_write
from support.flops import flops_per_token
from support.hub import read_config, resolve
from support.tokenizer import Tokenizer, tokenizer_paths

STEP = re.compile(r"step-(\d{7})")


def lock(out, flag="--out"):
    """Takes RUN/.lock (creating RUN) for as long as the returned file stays open. A second run on the
    same folder stops at once, told who holds it. flag: the tool's name for the folder in messages."""
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise OSError(f"cannot write to {flag} {out} ({e.strerror}): choose a folder you can write to") from None
    _hold(f, out, flag)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _hold(f, out, flag, mode=fcntl.LOCK_EX):
    """flock the open .lock file f (mode: exclusive, or shared to only look), or close it and say who holds it."""
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its pid yet"
        f.close()
        raise ValueError(f"{out} is in use by another run ({holder}): wait for it to end or stop it, "
                         f"or choose another {flag}") from None


def check_out(out, flag="--out"):
    """What lock() would refuse, found without writing anything: RUN is a file, or cannot be created
    or written to, or another run holds its .lock (looked at with a shared lock, released at once)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag} {out} is a file: give a folder")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a folder" if not os.path.isdir(existing) else "not writable"
        raise OSError(f"cannot write to {flag} {out} ({existing} is {why}): choose a folder you can write to")
    if os.path.exists(os.path.join(out, ".lock")):
        with open(os.path.join(out, ".lock")) as f:
            _hold(f, out, flag, fcntl.LOCK_SH)


def write_fault(e: OSError, what: str) -> OSError:
    """A failed write of `what` (a checkpoint, the log) as one line: the path, the cause, what to do."""
    advice = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space (the disk quota is used up)",
              errno.EROFS: "the file system is mounted read-only: make it writable",
              errno.EACCES: "this user may not write there: fix the folder's permissions",
              errno.EPERM: "this user may not write there: fix the folder's permissions"}.get(e.errno, "fix the cause")
    return OSError(f"cannot write {what}: {e.strerror or e}; {advice}, then run again with --resume "
                   "(the checkpoints saved before are whole)")


def stop(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like an error: partial saves are removed on the way out


def watch_launcher(launcher, rank):
    """torchrun died (SIGKILL leaves its workers running): stop this worker at once, even inside a
    collective that the others will never join. The OS releases the lock; the next start cleans up."""
    while os.getppid() == launcher:
        time.sleep(0.5)
    print(f"train.py: the launcher (pid {launcher}) is gone: worker {rank} stops", flush=True)
    os._exit(1)


@contextmanager
def sole_trainer(out, rank, torchrun):
    """The block runs as --out's one trainer once it has called the take() this yields (after every
    check): rank 0 then holds RUN/.lock (creating RUN) and removes what interrupted saves left, and
    again on the way out (RUN itself, if this run created it and left only the lock). SIGTERM unwinds
    like an error; under torchrun a worker whose launcher died stops at once. Other ranks write nothing."""
    handlers = ({signal.SIGTERM: signal.signal(signal.SIGTERM, stop)}
                if threading.current_thread() is threading.main_thread() else {})
    held, created = [], not os.path.exists(out)

    def take():
        if rank == 0:
            held.append(lock(out))
            clean(out)
    try:
        if torchrun:
            threading.Thread(target=watch_launcher, args=(os.getppid(), rank), daemon=True).start()
        yield take
    finally:
        if held:
            clean(out)
            if created and os.listdir(out) == [".lock"]:
                shutil.rmtree(out)
            held[0].close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def checkpoints(out):
    """The step-XXXXXXX folders of a run, oldest first."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return [os.path.join(out, d) for d in sorted(d for d in names if STEP.fullmatch(d))]


def step_of(path):
    m = STEP.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def restorable(out):
    """{RUN/step-XXXXXXX: folder}: the checkpoints that clean() puts back. A save killed between the two
    renames of checkpoint.save_checkpoint's fallback (no renameat2) leaves NAME absent, the finished
    new folder `.tmp-NAME-x` and the previous one `.tmp-NAME-x-old`; the new one (else the old) is NAME."""
    found = {}
    for name in os.listdir(out) if os.path.isdir(out) else []:
        m = re.fullmatch(r"\.tmp-(step-\d{7})-.+-old", name)
        if m and not os.path.exists(os.path.join(out, m.group(1))):
            new = os.path.join(out, name[:-len("-old")])
            found[os.path.join(out, m.group(1))] = new if os.path.isdir(new) else os.path.join(out, name)
    return found


def located(path):
    """Where the checkpoint `path` is now: itself, or the folder clean() will rename to it."""
    return restorable(os.path.dirname(path)).get(path, path) if path else path


def check_checkpoint_flags(resume, init):
    """--resume: nothing (--out's latest) or a step-XXXXXXX folder; the checkpoint to start from
    (--resume's, else --init's unless 'scratch'): a checkpoint folder, or a Hub id."""
    if resume not in (None, "latest") and step_of(resume) is None:
        raise ValueError(f"--resume {resume}: expected no value (--out's latest checkpoint) or a "
                         "step-XXXXXXX checkpoint folder")
    path = resume if resume not in (None, "latest") else init
    if not path or path == "scratch":
        return
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        steps = checkpoints(path)
        hint = f"it is a run folder: pass one of its checkpoints, e.g. {steps[-1]}" if steps else "it is no checkpoint"
        raise ValueError(f"{path} has no config.json: {hint}")
    if not os.path.exists(path) and (path.startswith((".", "/", "~")) or os.path.isdir(os.path.dirname(path))):
        raise ValueError(f"no checkpoint folder {path}: pass an existing folder, a Hub id, or 'scratch' with --preset")


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def clean(out):
    """Removes what interrupted saves left: save_pretrained's `.tmp-NAME-*` folders, pruned checkpoints
    being deleted (`.old-*`) and atomic_write's `.tmp-*` files, after putting back the checkpoints
    that are not debris (restorable)."""
    if not os.path.isdir(out):
        return
    for path, folder in restorable(out).items():
        os.rename(folder, path)
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


def resume_point(out, resume, fallback, discard_later, check):
    """(the checkpoint to continue from or None, later checkpoints to move aside, [(unreadable one, why)]),
    found by reading only: after a refusal here nothing has changed. Later checkpoints than the chosen
    one are refused unless --discard-later, unreadable latest ones unless --fallback; check(folder) may
    refuse the chosen checkpoint first."""
    found = sorted(checkpoints(out) + list(restorable(out)))
    if not resume:
        if found:
            raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or another --out")
        return None, [], []
    candidates = found[::-1] if resume == "latest" else [resume]
    if not candidates:
        return None, [], []
    bad = []
    for path in candidates:
        if (why := problem(located(path))) is None:
            break
        bad.append((path, why))
    else:
        raise ValueError(f"no readable checkpoint to resume from: {bad[0][1]}")
    if bad and not fallback:
        raise ValueError(f"{bad[0][1]}: pass --fallback to resume from {path}, the latest readable checkpoint "
                         f"(the unreadable ones are moved aside, not deleted), or repair the file")
    check(located(path))
    later = [p for p in found if step_of(p) > step_of(path)]
    if later and not discard_later and sorted(later) != sorted(p for p, _ in bad):
        raise ValueError(f"--resume {path}: {out} has later checkpoints ({', '.join(map(os.path.basename, later))}); "
                         "continuing from here would leave them as an abandoned second history. Pass "
                         "--discard-later to move them aside (into a discarded-* folder), or resume from the latest")
    return path, later, bad


def resume_from(args, identity, rank, ddp):
    """(checkpoint, the folder it is in now (located), its step) to continue from, or (None, None, 0),
    checked against this run's flags and data; nothing is written (begin moves what must go once the
    run holds the lock). Rank 0 picks it; every rank gets its path."""
    choice = [None]
    if rank == 0:
        check = lambda path: check_resume(path, args, identity)  # noqa: E731
        choice = [resume_point(args.out, args.resume, args.fallback, args.discard_later, check)[0]]
        if args.resume and choice[0] is None:
            print(f"--resume: no checkpoint in {args.out} yet; starting from --init", flush=True)
    if ddp:
        dist.broadcast_object_list(choice, src=0)
    folder = located(choice[0])
    return choice[0], folder, check_resume(folder, args, identity) if folder else 0


def begin(args, resume, start, rank):
    """Rank 0, holding RUN's lock (clean() has run): RUN becomes one history up to step `start` of
    `resume`, the checkpoint resume_from chose: later and unreadable ones moved aside (--discard-later,
    --fallback), all but the last --keep-last pruned, log.jsonl cut back to `start`."""
    if rank != 0:
        return
    path, later, bad = resume_point(args.out, args.resume, args.fallback, args.discard_later, lambda folder: None)
    if path != resume:
        raise ValueError(f"{args.out} changed while this run was being prepared (another run wrote to it): "
                         "start this run again")
    try:
        if later:
            for p, why in bad:
                print(f"warning: {why}; resuming from {path} instead (--fallback)", flush=True)
            print(f"moved {', '.join(map(os.path.basename, later))} aside into {move_aside(later, args.out)}",
                  flush=True)
        prune(args.out, args.keep_last)
        cut_log(os.path.join(args.out, "log.jsonl"), start)
    except OSError as e:
        raise write_fault(e, f"the run folder {args.out}") from None


def with_speed(record, args, net, world, device, seconds):
    """A step's log record with its tokens/s and peak memory, and on CUDA its MFU (support/flops.py)."""
    tokens = args.batch_size * args.seq_len * (2 if args.stage == "rm" else 1)
    record.update(tokens_per_s=tokens / seconds)
    if device.type == "cuda":
        # a micro-batch runs the self-conditioning pass if any of its rows (under FSDP: any rank's) draws it
        share = 1 - 0.5 ** (args.micro_batch_size * (world if args.fsdp else 1))
        flops = flops_per_token(net.args, net.num_params(), args.seq_len, args.stage, self_condition=share)
        record.update(mem_gb=torch.cuda.max_memory_allocated() / 2**30,
                      mfu=flops * tokens / seconds / (args.peak_tflops * 1e12 * world))
    else:
        record.update(mem_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return record


def append_log(out, record, rank):
    """One JSON record as a line of RUN/log.jsonl (rank 0's)."""
    if rank == 0:
        try:
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_fault(e, f"the log {os.path.join(out, 'log.jsonl')}") from None


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


# -----------------------------------------------------------------------------
# What a checkpoint holds


def saved_tokenizer(args, meta, init_source):
    """tokenizer.json ([PAD] included) and tokenizer_config.json for every checkpoint, from
    --tokenizer (which must be there and be the data's), else the first of the --init folder or the
    data's own tokenizer that is at hand."""
    sources = [s for s in (args.tokenizer, init_source, meta["tokenizer"]) if s]
    for src in sources:
        try:
            check_tokenizer(meta, src)
            tok, cfg_file = Tokenizer(src), tokenizer_paths(src)[1]
        except (FileNotFoundError, OSError):
            if src == args.tokenizer:
                raise
            continue
        cfg = json.loads(Path(cfg_file).read_text()) if cfg_file and os.path.isfile(cfg_file) else {}
        name = tok.tokenizer.id_to_token
        cfg.update(bos_token=name(tok.bos_id), eos_token=name(tok.eos_id), pad_token=name(tok.pad_id))
        return {"tokenizer.json": json.loads(tok.tokenizer.to_str()), "tokenizer_config.json": cfg}
    raise FileNotFoundError(f"no tokenizer found among {sources}: checkpoints need one for sample.py; "
                            "pass --tokenizer, the folder with the tokenizer.json the data was prepared with")


def generation_config(args):
    """generation_config.json of a diffusion checkpoint: sample.py's defaults for it (the released
    evaluation's, with rows as long as the ones trained on)."""
    return {"steps": 100, "top_p": 0.99, "total_length": args.seq_len, "guidance_steps": 1, "tau": 1.0,
            "chat": args.stage == "sft"}


def checkpoint_files(args, meta, init_tokenizer):
    """The files every checkpoint of the run holds besides weights and training state."""
    files = saved_tokenizer(args, meta, init_tokenizer)
    if args.stage in ("adapt", "sft"):
        files["generation_config.json"] = generation_config(args)
    return files


# flags that change what a run computes: a --resume must repeat them (--micro-batch-size, --fsdp and
# the logging flags do not change a step)
RUN_FLAGS = ("stage", "seq_len", "batch_size", "max_steps", "lr", "schedule", "warmup_steps", "weight_decay",
             "adam_betas", "grad_clip", "loss_weighting", "ul2_prefix", "overfit", "seed",
             "lora", "lora_alpha", "lora_dropout", "lora_targets")


def dataset_identity(path, ds):
    return dict(path=os.path.realpath(path), kind=ds.meta["kind"], vocab_sha256=ds.meta["vocab_sha256"],
                num_tokens=ds.meta["num_tokens"], num_examples=ds.meta.get("num_examples"))


def check_resume(path, args, identity):
    """Refuses to continue a checkpoint with another run's flags or data, naming the flag to fix."""
    info = json.loads(Path(path, "train_state.json").read_text())
    run = info.get("run", info["args"])
    for key in RUN_FLAGS:
        old, new = run.get(key), getattr(args, key)
        if key in run and (list(old) if isinstance(old, (list, tuple)) else old) != \
                (list(new) if isinstance(new, (list, tuple)) else new):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"--resume {path}: it was trained with {flag} {old}, this run asks for {new}: "
                             f"pass {flag} {old}, or start a new --out")
    old = info.get("dataset")
    if old is not None and old != identity:
        diff = ", ".join(f"{k} {old.get(k)} -> {identity[k]}" for k in identity if old.get(k) != identity[k])
        raise ValueError(f"--resume {path}: it was trained on --data {old['path']}, this run's --data differs "
                         f"({diff}): pass --data {old['path']}, or start a new --out")
    return info["step"]


def train_state(args, step, num_examples, identity):
    """train_state.json: the step, how far into --data it is, the dataset's identity and the run's flags."""
    position = dict(samples_seen=step * args.batch_size, epoch=step * args.batch_size / num_examples)
    return dict(step=step, stage=args.stage, data=position, dataset=identity,
                run={k: getattr(args, k) for k in RUN_FLAGS}, args=vars(args))


def save_checkpoint(args, step, objective, net, opt, files, rank):
    """All ranks gather the full state; rank 0 writes it (atomically: model.save_pretrained). A LoRA
    run gathers and writes its adapters only (PEFT's layout) and their AdamW state."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 (FSDP)
    state = lora.adapter_state(net) if hasattr(net, "adapter") else get_model_state_dict(objective, options=opts)
    optim = get_optimizer_state_dict(objective, opt, options=opts)
    if rank == 0:
        final = os.path.join(args.out, f"step-{step:07d}")  # replaced whole if a --resume saves it again
        extra = {**files, "train_state.pt": {"step": step, "optimizer": optim, "args": vars(args)}}
        try:
            if hasattr(net, "adapter"):
                lora.save_adapter(net, final, extra_files=extra, state=state)
            else:
                with torch.device("meta"):
                    full = Transformer(net.args)
                full.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, assign=True)
                full.save_pretrained(final, extra_files=extra)
            prune(args.out, args.keep_last)
        except OSError as e:  # a full disk, a read-only file system: the save left nothing behind
            raise write_fault(e, f"checkpoint {final}") from None
        print(f"saved {final}", flush=True)
    if dist.is_initialized():
        dist.barrier()


def load_optimizer(path, objective, opt, rank, ddp):
    """AdamW's state from the checkpoint at `path` (nothing if None): rank 0 reads it whole and sends
    each rank its part."""
    if path is None:
        return
    state = torch.load(os.path.join(path, "train_state.pt"), weights_only=True) if rank == 0 else {}
    set_optimizer_state_dict(objective, opt, state.get("optimizer", {}),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=ddp))


# -----------------------------------------------------------------------------
# The model a run starts from


# what run_folder.checkpoint_kind finds, in words, and what to pass instead where a stage refuses it
KINDS = dict(lm="a causal LM", diffusion="a diffusion LM (bidirectional, with a timestep embedding)",
             reward="a reward model (a score head, no LM head)")
INSTEAD = dict(lm="adapt it first (--stage adapt --init it) and pass that run's checkpoint",
               diffusion="pass the causal LM it was adapted from, or scratch: made causal and without its timestep "
               "embedding, it would be a new, untrained model under the old one's name",
               reward="pass the causal LM it was trained from")


def check_start(args, meta, folder, accepted):
    """What a run starts from: `folder` (the checkpoint --resume continues), else --init, checked before
    any weights are read: a --tokenizer must be the data's, and the checkpoint one of the `accepted`
    kinds of --stage (by config.json alone), so that the config.json it saves says what was trained."""
    init = folder or args.init
    if init is None:
        raise ValueError("--init is required: a Hub id, a checkpoint folder, or 'scratch' with --preset")
    if args.tokenizer:
        check_tokenizer(meta, args.tokenizer)  # names the path if nothing is there
    kind = None if init == "scratch" else checkpoint_kind(init)
    if kind is not None and kind not in accepted:
        raise ValueError(f"--stage {args.stage} starts from scratch or from {' or '.join(KINDS[k] for k in accepted)}, "
                         f"but {init} is {KINDS[kind]}: {INSTEAD[kind]}")
    return init


def read_shards(objective, net, device, seed):
    """FSDP2: a model that load_model built on the meta device (net.checkpoint set), now sharded by
    fully_shard: each rank reads its own rows (model.load_sharded); new LoRA adapters are drawn on the base."""
    if getattr(net, "checkpoint", None):
        objective.to_empty(device=device)
        load_sharded(net, net.checkpoint, verbose=int(os.environ.get("RANK", 0)) == 0)
        if hasattr(net, "adapter") and not lora.is_adapter(net.checkpoint):
            lora.init_adapters(net, seed)


def checkpoint_kind(init) -> str:
    """What the checkpoint `init` (Hub id or folder; a LoRA adapter: what it adapts to) is, from its
    config.json alone: "reward" (a score head), "diffusion" (a timestep embedding, or bidirectional
    attention) or "lm" (a causal LM)."""
    path = resolve(init)
    if lora.is_adapter(path) and not os.path.exists(os.path.join(path, "config.json")):  # PEFT's own save
        adapter = lora.read_adapter_config(path)
        cfg = ModelArgs.from_hf(read_config(resolve(adapter["base_model_name_or_path"])),
                                **({"head": "score"} if adapter.get("task_type") == "SEQ_CLS" else {}))
    else:
        cfg = ModelArgs.from_hf(read_config(path))
    return "reward" if cfg.head == "score" else "diffusion" if cfg.timestep_embed or not cfg.causal else "lm"


def grow_vocab(net, vocab_size):
    """Mistral has 32000 ids and TESS 2 adds [PAD] (id 32000), which the model learns to emit after
    EOS (METHOD.md §8). The new rows of the embedding and the LM head start as the mean of the old
    rows, so the new token starts as an average token rather than a random one."""
    old = net.args.vocab_size
    with torch.no_grad():
        for mod in [net.model.embed_tokens] + ([net.lm_head] if net.args.head == "lm" else []):
            w = mod.weight  # (V_old, D)
            mod.weight = nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - old, -1)]))
    net.args.vocab_size = net.model.embed_tokens.num_embeddings = vocab_size
    if net.args.head == "lm":
        net.lm_head.out_features = vocab_size
        if net.args.tie_word_embeddings:
            net.lm_head.weight = net.model.embed_tokens.weight


def load_model(init, meta, overrides, device, sharded, lora_run=False):
    """(net, tokenizer source) from a checkpoint (Hub id or folder) with the architecture `overrides`
    (model.ModelArgs fields), checked against the data's tokenizer; a checkpoint one [PAD] short gets
    its row (grow_vocab). sharded (FSDP2): the model is returned on the meta device, with
    net.checkpoint set for train.wrap to read each rank's shards from. A LoRA adapter folder comes
    with its adapters for a LoRA run (lora_run), and merged into its base for full training."""
    path = resolve(init)
    if lora.is_adapter(path):
        return _load_adapter(path, meta, overrides, device, sharded, lora_run)
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer.json"))
    if has_tokenizer:
        check_tokenizer(meta, path)  # same id -> token table as the data ([PAD] added if missing)
    cfg = ModelArgs.from_hf(read_config(path), **overrides)
    grow = meta["vocab_size"] == cfg.vocab_size + 1 and meta["pad_id"] == cfg.vocab_size  # Mistral 32000 + [PAD]
    verbose = int(os.environ.get("RANK", 0)) == 0
    if sharded:  # built on the meta device; train.wrap shards it, then each rank reads its own rows
        with torch.device("meta"):
            net = Transformer(replace(cfg, vocab_size=cfg.vocab_size + grow))
        net.checkpoint = path
    else:
        net = Transformer.from_pretrained(path, dtype=torch.float32, device=device, verbose=verbose, **overrides)
        if grow:
            grow_vocab(net, cfg.vocab_size + 1)
    if grow and verbose:
        print(f"grew the vocabulary {cfg.vocab_size} -> {cfg.vocab_size + 1}: new rows are the mean of the old ones",
              flush=True)
    check_tokenizer(meta, net.args.vocab_size)
    return net, path if has_tokenizer else None


def _load_adapter(path, meta, overrides, device, sharded, lora_run):
    """load_model of a LoRA adapter folder (it holds config.json and the tokenizer, as any checkpoint)."""
    check_tokenizer(meta, path)
    if not sharded:
        net = Transformer.from_pretrained(path, dtype=torch.float32, device=device,
                                          verbose=int(os.environ.get("RANK", 0)) == 0, **overrides)
    else:  # on the meta device with its adapters; load_sharded reads the base's shards and the adapter's
        with torch.device("meta"):
            net = Transformer(ModelArgs.from_hf(read_config(path), **overrides))
        ad = lora.read_adapter_config(path)
        lora.apply_lora(net, ad["base_model_name_or_path"], ad["r"], ad["lora_alpha"], ad["lora_dropout"],
                        ad["target_modules"], ad["trainable_token_indices"])
        net.checkpoint = path
    if not lora_run:
        if sharded:
            raise ValueError(f"{path} is a LoRA adapter: to train all weights under --fsdp, merge it first "
                             f"(python -m support.lora merge {path} MERGED) and pass --init MERGED")
        return lora.merge(net), path
    check_tokenizer(meta, net.args.vocab_size)
    return net, path
