"""
The run folder (train.py's --out): one trainer at a time, nothing left behind by an interruption,
and the checkpoint a --resume continues from, with one coherent log.

  RUN/.lock             flock'ed by the trainer for its whole life (pid and host inside); the OS
                        releases it when the process dies, however it dies, so no lock goes stale
  RUN/step-XXXXXXX/     checkpoints (model.save_pretrained: built under .tmp-*, then renamed in)
  RUN/log.jsonl         one JSON record per line; cut back to the step a run resumes from
  RUN/discarded-*/      checkpoints moved aside by --discard-later or --fallback (never deleted)

A checkpoint is the Hugging Face layout (config.json, fp32 safetensors, tokenizer with [PAD];
generation_config.json for a diffusion model) plus train_state.pt (AdamW state; tensors and
primitives only, read with weights_only=True) and train_state.json (step, data position, the
dataset's identity, the run's flags). Reading the model a run starts from (--init, or the
checkpoint --resume continues) is here too: load_model.
"""
import fcntl
import json
import os
import re
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
from model import ModelArgs, Transformer
from support import lora
from support.cli import atomic_write
from support.hub import read_config, resolve
from support.tokenizer import Tokenizer, tokenizer_paths

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
    """The block runs as --out's one trainer: rank 0 holds RUN/.lock and removes what interrupted saves
    left, before and after; SIGTERM unwinds like an error; under torchrun a worker whose launcher
    died stops at once. Other ranks write nothing to --out."""
    handlers = ({signal.SIGTERM: signal.signal(signal.SIGTERM, stop)}
                if threading.current_thread() is threading.main_thread() else {})
    held = None
    try:
        held = lock(out) if rank == 0 else None
        if rank == 0:
            clean(out)
        if torchrun:
            threading.Thread(target=watch_launcher, args=(os.getppid(), rank), daemon=True).start()
        yield
    finally:
        if held is not None:
            clean(out)
            held.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def checkpoints(out):
    """The step-XXXXXXX folders of a run, oldest first."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return [os.path.join(out, d) for d in sorted(d for d in names if STEP.fullmatch(d))]


def step_of(path):
    m = STEP.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


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


def resume_point(out, resume, fallback, discard_later, check):
    """The checkpoint folder to continue from (None: start from --init), after making --out one history:
    later checkpoints than it are moved aside (--discard-later), unreadable latest ones too (--fallback).
    check(path) may refuse the chosen checkpoint (raise) before anything is moved."""
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
    check(path)
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


def resume_from(args, identity, rank, ddp):
    """(checkpoint, its step) to continue from, or (None, 0): rank 0 picks it (checked against this run's
    flags and data first, then later or unreadable ones are moved aside); every rank gets its path."""
    choice = [None]
    if rank == 0:
        check = lambda path: check_resume(path, args, identity)  # noqa: E731
        choice = [resume_point(args.out, args.resume, args.fallback, args.discard_later, check)]
    if ddp:
        dist.broadcast_object_list(choice, src=0)
    return choice[0], check_resume(choice[0], args, identity) if choice[0] else 0


def begin(out, step, keep_last):
    """--out as one history up to `step`, once a run has checked everything: log.jsonl cut back to it,
    checkpoints beyond the last --keep-last removed."""
    prune(out, keep_last)
    cut_log(os.path.join(out, "log.jsonl"), step)


def append_log(out, record, rank):
    """One JSON record as a line of RUN/log.jsonl (rank 0's)."""
    if rank == 0:
        with open(os.path.join(out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


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
    """tokenizer.json ([PAD] included) and tokenizer_config.json for every checkpoint, from the
    first of --tokenizer, the --init folder, or the data's own tokenizer that is at hand."""
    sources = [s for s in (args.tokenizer, init_source, meta["tokenizer"]) if s]
    for src in sources:
        try:
            check_tokenizer(meta, src)
            tok, cfg_file = Tokenizer(src), tokenizer_paths(src)[1]
        except (FileNotFoundError, OSError):
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
        if hasattr(net, "adapter"):
            lora.save_adapter(net, final, extra_files=extra, state=state)
        else:
            with torch.device("meta"):
                full = Transformer(net.args)
            full.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, assign=True)
            full.save_pretrained(final, extra_files=extra)
        prune(args.out, args.keep_last)
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
