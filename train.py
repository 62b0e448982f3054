"""
Training for every stage of TESS 2, on one device or many (DDP, or FSDP2 with --fsdp).

  adapt  UL2-mixed diffusion loss on packed token streams (SPEC 7); an AR model becomes bidirectional
  sft    prefix-LM diffusion loss on single-turn chat data (SPEC 8)
  rm     Bradley-Terry reward model: -log sigmoid(r_chosen - r_rejected) (SPEC 10, App. C)
  ar     plain next-token loss: the AR baseline, and the base model of small experiments

  python train.py --stage adapt --init mistralai/Mistral-7B-v0.1 --data data/dolma --out runs/adapt
  torchrun --nproc_per_node 8 train.py --stage adapt --fsdp --grad-ckpt ...   # 7B: shard weights + AdamW

Every loss is a sum over the step's whole global batch divided by its number of targets, and every
random draw is a pure function of (--seed, global sample index) or (--seed, step): one process with
gradient accumulation, N processes under DDP or FSDP give the same step, and --resume continues
exactly with no RNG state to restore. Checkpoints are <out>/step-XXXXXXX/ in Hugging Face layout
(fp32 weights, tokenizer with [PAD]) plus train_state.pt (AdamW state, step, arguments; tensors and
primitives only, read with weights_only=True) and train_state.json (step, data position, arguments).
"""
import argparse
import json
import math
import os
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import tess2
from data.shards import check_tokenizer, global_indices, open_dataset
from common import resolve
from model import Transformer, preset
from tokenizer import Tokenizer, tokenizer_paths

# Defaults per stage (each has a flag). adapt: the released run (200k steps, 5000 = 2.5% warm-up
# steps, then constant). sft/rm: the paper (3% warm-up, linear decay; sft 3 epochs, rm 1 epoch of
# batch 512); the sft batch is not given in the paper, 128 is Tulu 2's. ar: a usual small-model recipe.
STAGES = {
    "adapt": dict(kinds=("tokens",), lr=1e-5, schedule="constant", warmup=0.025, batch_size=112,
                  seq_len=2048, max_steps=200_000, model=dict(timestep_embed=True, causal=False)),
    "sft": dict(kinds=("spans",), lr=1e-5, schedule="linear", warmup=0.03, batch_size=128,
                seq_len=2048, epochs=3.0, model=dict(timestep_embed=True, causal=False)),
    "rm": dict(kinds=("pairs",), lr=5e-6, schedule="linear", warmup=0.03, batch_size=512,
               seq_len=2048, epochs=1.0, model=dict(head="score", causal=True)),
    "ar": dict(kinds=("tokens", "spans"), lr=3e-4, schedule="cosine", warmup=0.03, batch_size=64,
               seq_len=1024, max_steps=5000, model=dict()),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a TESS 2 stage (adapt, sft, rm) or an AR baseline.")
    arg = p.add_argument
    arg("--stage", required=True, choices=STAGES, help="what to train (see the top of train.py)")
    arg("--init", help="Hub id, Hugging Face folder, one of our step-XXXXXXX folders, or 'scratch'")
    arg("--preset", help="model preset for --init scratch (model.PRESETS: tiny, small, ...)")
    arg("--data", required=True, help="dataset folder made by a data/ prepare script")
    arg("--val-data", help="held-out dataset folder for the periodic eval loss")
    arg("--tokenizer", help="tokenizer folder copied into checkpoints (default: --init's, else the data's)")
    arg("--out", required=True, help="run folder: step-XXXXXXX checkpoints and log.jsonl")
    arg("--resume", nargs="?", const="latest", help="continue from --out's latest checkpoint, or this one")
    arg("--seq-len", type=int, help="sequence length L (default: per stage)")
    arg("--batch-size", type=int, help="global batch in sequences, pairs for rm (default: per stage)")
    arg("--micro-batch-size", type=int, default=1, help="sequences per process and forward pass")
    arg("--max-steps", type=int, help="optimizer steps in all (default: per stage)")
    arg("--epochs", type=float, help="set --max-steps from passes over --data")
    arg("--stop-at", type=int, help="stop (and save) after this step; the LR still follows --max-steps")
    arg("--lr", type=float, help="peak learning rate (default: per stage)")
    arg("--schedule", choices=("constant", "linear", "cosine"), help="after warm-up (cosine: to lr/10)")
    arg("--warmup-steps", type=int, help="linear warm-up steps (default: 2.5%% of --max-steps, sft/rm/ar 3%%)")
    arg("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the matrices")
    arg("--adam-betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW beta1 beta2")
    arg("--grad-clip", type=float, default=1.0, help="clip the global grad norm to this (0: off)")
    arg("--ul2-prefix", choices=("released", "paper"), default="released",
        help="adapt's prefix-LM objective: random prefix (released code) or half (paper)")
    arg("--overfit", action="store_true", help="train on the first global batch only (debugging)")
    arg("--seed", type=int, default=0, help="seeds data order, t, noise, masks and a scratch init")
    arg("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if present")
    arg("--dtype", choices=("bf16", "fp32"), help="compute dtype (default: bf16 on CUDA); weights stay fp32")
    arg("--fsdp", action="store_true", help="shard weights, gradients and AdamW state (FSDP2)")
    arg("--grad-ckpt", action="store_true", help="activation checkpointing per layer")
    arg("--eval-every", type=int, default=0, help="eval on --val-data every N steps (0: at the end)")
    arg("--eval-batches", type=int, default=10, help="global batches of --val-data per eval")
    arg("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    arg("--keep-last", type=int, default=0, help="keep only the last K checkpoints (0: all)")
    arg("--log-every", type=int, default=1, help="print a log line every N steps")
    arg("--peak-tflops", type=float, default=989.0, help="per-GPU peak for MFU (H100 bf16 dense: 989)")
    args = p.parse_args(argv)
    for key in ("lr", "schedule", "batch_size", "seq_len"):
        if getattr(args, key) is None:
            setattr(args, key, STAGES[args.stage][key])
    return args


def compute_init(device="auto"):
    """(ddp, rank, local_rank, world, device); under torchrun starts the process group (NCCL or gloo)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return ddp, rank, local_rank, world, dev


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def all_sum(x, ddp):
    if ddp:
        dist.all_reduce(x)
    return x


# -----------------------------------------------------------------------------
# One step: its learning rate, its batches (randomness keyed by global sample index), its loss


def lr_at(step, lr, warmup, max_steps, schedule, min_ratio=0.1):
    """LR of optimizer step `step` (0-based): linear warm-up to lr over `warmup` steps, then
    constant, linear decay to 0 at max_steps, or cosine decay to min_ratio * lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * {"constant": 1.0, "linear": 1 - progress,
                 "cosine": min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))}[schedule]


def sample_seed(seed, n, stream):
    """A generator seed for (run seed, global sample index or step, stream < 4)."""
    return ((seed << 42) + (n << 2) + stream) % 2**64


def self_condition_coin(seed, step):
    """Sec. 3.1: self-condition this step with probability 0.5; the same on every rank and micro-batch."""
    g = torch.Generator().manual_seed(sample_seed(seed, step, 2))
    return bool(torch.rand((), generator=g) < 0.5)


def make_batch(args, ds, keys):
    """The micro-batch of global sample indices `keys`, on the host. For the diffusion stages each
    sequence gets its timestep t, UL2 mask (adapt) and noise seed from its index alone, so splitting
    a global batch over ranks and micro-batches changes nothing."""
    b = ds.batch([n % args.batch_size for n in keys] if args.overfit else keys, args.seq_len, args.seed)
    if args.stage in ("adapt", "sft"):
        gens = [torch.Generator().manual_seed(sample_seed(args.seed, n, 0)) for n in keys]
        b["t"] = torch.stack([torch.randint(tess2.NUM_TRAIN_STEPS, (), generator=g) for g in gens])  # (B,) SPEC 3
        if args.stage == "adapt":  # each sequence's mask from its generator, after its t
            b["span_mask"] = torch.stack([tess2.ul2_mask(args.seq_len, g, prefix=args.ul2_prefix) for g in gens])
        b["noise_seeds"] = [sample_seed(args.seed, n, 1) for n in keys]
    return b


def target_count(stage, b):
    """How many terms the loss of this micro-batch sums: span positions j >= 1 (diffusion, SPEC 5),
    next-token targets (ar; span positions only on SFT data), pairs (rm)."""
    if stage == "rm":
        return b["chosen"].size(0)
    if "span_mask" in b:
        return int(b["span_mask"][:, 1:].sum())
    return b["ids"].size(0) * (b["ids"].size(1) - 1)


class Objective(nn.Module):
    """The stage's loss summed over a micro-batch. DDP and FSDP wrap this module rather than the
    network, because the diffusion loss uses the embedding matrix and the LM head outside the
    network's forward (tess2.predict); inside this forward all weights are in place."""

    def __init__(self, net, stage):
        super().__init__()
        self.net, self.stage = net, stage

    def forward(self, b, self_condition=False):
        net, ids = self.net, b.get("ids")
        if self.stage in ("adapt", "sft"):
            eps = tess2.row_noise(b["noise_seeds"], ids.size(1), net.args.vocab_size, ids.device)  # (B, L, V)
            return tess2.diffusion_loss(net, ids, b["span_mask"], t=b["t"], eps=eps,
                                        self_condition=self_condition, reduction="sum")[0]
        if self.stage == "ar":
            logits = net(ids=ids, causal=True)[:, :-1]  # (B, L-1, V): position i predicts token i+1
            targets = ids[:, 1:].masked_fill(~b["span_mask"][:, 1:], -100) if "span_mask" in b else ids[:, 1:]
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="sum")
        ids = torch.cat([b["chosen"], b["rejected"]])  # (2B, L): one pass for both sides
        r = net(ids=ids, causal=True, last_index=torch.cat([b["chosen_last"], b["rejected_last"]]))  # (2B,)
        r_chosen, r_rejected = r.float().chunk(2)
        return -F.logsigmoid(r_chosen - r_rejected).sum()  # Bradley-Terry


# -----------------------------------------------------------------------------
# Data and model, checked against each other; checkpoints


def open_checked(path, stage, meta=None):
    ds = open_dataset(path)
    kinds = STAGES[stage]["kinds"]
    if ds.meta["kind"] not in kinds:
        raise ValueError(f"--stage {stage} trains on {' or '.join(kinds)} data, but {path} holds "
                         f"{ds.meta['kind']!r} data")
    if meta is not None and ds.meta["vocab_sha256"] != meta["vocab_sha256"]:
        raise ValueError(f"{path} was tokenized with {ds.meta['tokenizer']}, the training data with "
                         f"{meta['tokenizer']}: prepare both with the same tokenizer")
    return ds


def grow_vocab(net, vocab_size):
    """Mistral has 32000 ids and TESS 2 adds [PAD] (id 32000), which the model learns to emit after
    EOS (SPEC 8). The new rows of the embedding and the LM head start as the mean of the old rows,
    so the new token starts as an average token rather than a random one."""
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
    print0(f"grew the vocabulary {old} -> {vocab_size}: new rows are the mean of the old ones")


def build_model(args, meta, init, device):
    """Returns (net, tokenizer source). init: 'scratch' or a checkpoint (Hub id or folder)."""
    overrides = STAGES[args.stage]["model"]
    if init == "scratch":
        if args.preset is None:
            raise ValueError("--init scratch needs --preset (e.g. tiny, small)")
        torch.manual_seed(args.seed)  # the same weights on every rank
        net = Transformer(preset(args.preset, vocab_size=meta["vocab_size"], **overrides)).init_weights()
        return net.to(device), None
    path = resolve(init)
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer.json"))
    if has_tokenizer:
        check_tokenizer(meta, path)  # same id -> token table as the data ([PAD] added if missing)
    net = Transformer.from_pretrained(path, dtype=torch.float32, device=device,
                                      verbose=int(os.environ.get("RANK", 0)) == 0, **overrides)
    V = net.args.vocab_size
    if meta["vocab_size"] == V + 1 and meta["pad_id"] == V:
        grow_vocab(net, V + 1)  # Mistral (32000) + [PAD] = 32001
    check_tokenizer(meta, net.args.vocab_size)
    return net, path if has_tokenizer else None


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


def checkpoints(out):
    steps = sorted(int(m.group(1)) for d in (os.listdir(out) if os.path.isdir(out) else [])
                   if (m := re.fullmatch(r"step-(\d{7})", d)))
    return [os.path.join(out, f"step-{s:07d}") for s in steps]


def resume_point(args):
    """(checkpoint folder, its step) to continue from, or (None, 0) to start from --init."""
    if not args.resume:
        if checkpoints(args.out):
            raise ValueError(f"{args.out} already holds checkpoints: pass --resume to continue, or another --out")
        return None, 0
    found = checkpoints(args.out) if args.resume == "latest" else [args.resume]
    if not found:
        print0(f"--resume: no checkpoint in {args.out} yet; starting from --init")
        return None, 0
    path = found[-1]
    if not os.path.exists(os.path.join(path, "train_state.pt")):
        raise FileNotFoundError(f"{path} has no train_state.pt: not a checkpoint written by train.py")
    info = json.loads(Path(path, "train_state.json").read_text())
    for key in ("stage", "seq_len", "batch_size", "seed", "overfit"):  # they define the data and noise
        if info["args"][key] != getattr(args, key):
            raise ValueError(f"--resume {path}: it was trained with --{key.replace('_', '-')} "
                             f"{info['args'][key]}, this run asks for {getattr(args, key)}")
    return path, info["step"]


def discard(path):
    """Rename a checkpoint away, then delete it: a crash mid-way never leaves half of one under its name."""
    trash = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(path))
    os.rename(path, os.path.join(trash, "x"))
    shutil.rmtree(trash)


def save_checkpoint(args, step, objective, net, opt, extra, rank):
    """All ranks gather the full state; rank 0 writes it (atomically: model.save_pretrained)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 (FSDP)
    state = get_model_state_dict(objective, options=opts)
    optim = get_optimizer_state_dict(objective, opt, options=opts)
    if rank == 0:
        with torch.device("meta"):
            full = Transformer(net.args)
        full.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, assign=True)
        final = os.path.join(args.out, f"step-{step:07d}")  # replaced whole if a --resume saves it again
        state = {"step": step, "optimizer": optim, "args": vars(args)}
        full.save_pretrained(final, extra_files={**extra, "train_state.pt": state})
        for old in checkpoints(args.out)[:-args.keep_last] if args.keep_last else []:
            discard(old)
        print0(f"saved {final}")
    if dist.is_initialized():
        dist.barrier()


def flops_per_token(a, n_params, seq_len, stage):
    """Model FLOPs per trained token (PaLM, App. B): 6N for the weights' forward and backward plus
    12 * layers * D * L for attention. Diffusion steps self-condition half the time with one more
    forward pass (a third of forward + backward). Recomputation under --grad-ckpt is not counted."""
    flops = 6 * n_params + 12 * a.num_hidden_layers * a.hidden_size * seq_len
    return flops * (1 + 0.5 / 3) if stage in ("adapt", "sft") else flops


# -----------------------------------------------------------------------------
# Training


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world, device = compute_init(args.device)
    stage = STAGES[args.stage]
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    if args.fsdp and not ddp:
        raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N")
    accum, rem = divmod(args.batch_size, world * args.micro_batch_size)
    if rem or accum == 0:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of processes ({world}) x "
                         f"--micro-batch-size ({args.micro_batch_size})")
    ds = open_checked(args.data, args.stage)
    val = open_checked(args.val_data, args.stage, ds.meta) if args.val_data else None
    n_examples = ds.num_examples(args.seq_len)
    if n_examples == 0:
        raise ValueError(f"{args.data} has no example at --seq-len {args.seq_len}")
    if args.max_steps is None:
        epochs = args.epochs or stage.get("epochs")
        args.max_steps = math.ceil(epochs * n_examples / args.batch_size) if epochs else stage["max_steps"]
    if args.warmup_steps is None:
        args.warmup_steps = round(stage["warmup"] * args.max_steps)

    resume, start = resume_point(args)
    if resume is None and args.init is None:
        raise ValueError("--init is required: a Hub id, a checkpoint folder, or 'scratch' with --preset")
    net, init_tok = build_model(args, ds.meta, resume or args.init, device)
    limit = min(net.args.max_position_embeddings, net.args.sliding_window or math.inf)
    if args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} is beyond what the model attends over ({limit}, "
                         "max_position_embeddings / sliding_window): lower --seq-len")
    extra = saved_tokenizer(args, ds.meta, init_tok)
    net.gradient_checkpointing = args.grad_ckpt
    n_params = net.num_params()
    flops = flops_per_token(net.args, n_params, args.seq_len, args.stage)
    tokens_per_step = args.batch_size * args.seq_len * (2 if args.stage == "rm" else 1)

    # wrap: FSDP2 shards every block and then the rest; DDP replicates
    objective = Objective(net, args.stage)
    if args.fsdp:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32,
                                  reduce_dtype=torch.float32)
        for block in net.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(objective, mp_policy=mp)
    elif ddp:
        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    params = list(objective.parameters())
    opt = torch.optim.AdamW([dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
                             dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
                            lr=args.lr, betas=tuple(args.adam_betas), fused=device.type == "cuda")
    if resume:  # rank 0 reads the full AdamW state and sends each rank its part
        state = torch.load(os.path.join(resume, "train_state.pt"), weights_only=True) if rank == 0 else {}
        set_optimizer_state_dict(objective, opt, state.get("optimizer", {}),
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=ddp))
        del state
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not args.fsdp)

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")
    if rank == 0 and os.path.exists(log_path):  # drop what a stopped run logged after its checkpoint
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start]
        with open(log_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(log_path + ".tmp", log_path)

    def log(record):
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def step_loss(dataset, step, backward):
        """The global batch's loss, a device tensor: the sum over all micro-batches and ranks divided
        by the global number of targets. Nothing here waits for the device."""
        batches = [make_batch(args, dataset, global_indices(step, m, rank, world, args.batch_size,
                                                            args.micro_batch_size)) for m in range(accum)]
        count = torch.tensor(sum(target_count(args.stage, b) for b in batches)).to(device, non_blocking=True)
        count = all_sum(count, ddp).clamp(min=1)
        coin = self_condition_coin(args.seed, step)
        total = torch.zeros((), device=device)
        for m, b in enumerate(batches):
            b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
            if isinstance(objective, DDP):
                objective.require_backward_grad_sync = m == accum - 1  # all-reduce once per step
            with autocast:
                loss = objective(b, self_condition=coin)
            if backward:
                (loss * world / count).backward()  # DDP and FSDP average over ranks
            total += loss.detach().float()
        return all_sum(total, ddp) / count

    print0(f"{args.stage}: {n_params / 1e6:.1f}M parameters, {'FSDP2' if args.fsdp else 'DDP' if ddp else 'single'}, "
           f"{world} process(es) x {accum} micro-batches of {args.micro_batch_size}, steps {start} -> {args.max_steps}")
    last = min(args.max_steps, args.stop_at or args.max_steps)
    for step in range(start, last):
        t0 = time.time()
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = step_loss(ds, step, backward=True)
        norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), args.grad_clip or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        loss, norm = torch.stack([loss, norm.float()]).tolist()  # the step's one wait for the device
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise FloatingPointError(f"step {step + 1}: loss {loss}, grad norm {norm}; stopped before the "
                                     "optimizer step and saved nothing. Lower --lr, check the data, or --resume "
                                     "from the last checkpoint")
        opt.step()
        opt.zero_grad(set_to_none=True)
        done, dt = step + 1, time.time() - t0
        record = dict(step=done, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tokens_per_step / dt)
        if device.type == "cuda":
            record.update(mem_gb=torch.cuda.max_memory_allocated() / 2**30,
                          mfu=flops * tokens_per_step / dt / (args.peak_tflops * 1e12 * world))
        else:
            record.update(mem_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        log(record)
        if done % args.log_every == 0 or done == last:
            print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if val and ((args.eval_every and done % args.eval_every == 0) or done == args.max_steps):
            objective.eval()
            with torch.no_grad():
                val_loss = sum(step_loss(val, i, backward=False) for i in range(args.eval_batches)).item()
            objective.train()
            log(dict(step=done, val_loss=val_loss / args.eval_batches))
            print0(f"step {done}: val loss {val_loss / args.eval_batches:.4f}")
        if done % args.save_every == 0 or done == last:
            position = dict(samples_seen=done * args.batch_size, epoch=done * args.batch_size / n_examples)
            info = dict(step=done, stage=args.stage, data=position, args=vars(args))
            save_checkpoint(args, done, objective, net, opt, {**extra, "train_state.json": info}, rank)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"train.py: error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
