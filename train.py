"""
Training for every stage of TESS 2, on one device or many (DDP, or FSDP2 with --fsdp).

  adapt  UL2-mixed diffusion loss on packed token streams (METHOD.md §7); an AR model becomes bidirectional
  sft    prefix-LM diffusion loss on single-turn chat data (METHOD.md §8)
  rm     Bradley-Terry reward model: -log sigmoid(r_chosen - r_rejected) (METHOD.md §10, paper App. C)
  ar     plain next-token loss: the AR baseline, and the base model of small experiments

  python train.py --stage adapt --init mistralai/Mistral-7B-v0.1 --data data/dolma --out runs/adapt
  torchrun --nproc_per_node 8 train.py --stage adapt --fsdp --grad-ckpt ...   # 7B: shard weights + AdamW

A step's loss is a sum over its whole global batch divided by one count (target_count: sequences
for the diffusion stages' per-sequence weighting, targets for token weighting, pairs for rm), and
every random draw is a pure function of (--seed, global sample index): one process with gradient
accumulation, N processes under DDP or FSDP give the same step, and --resume continues exactly
with no RNG state to restore. The run folder (checkpoints in Hugging Face layout plus the AdamW
state, log.jsonl, one trainer at a time, recovery from interruptions) is support/run_folder.py's.
"""
import hashlib
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import tess2
from data.shards import PairDataset, SpanDataset, TokenDataset, global_indices, open_dataset
from model import Transformer, preset
from support import fused_loss, lora, run_folder
from support.cli import ArgumentParser, number, run_cli, seed_flag

# Defaults per stage (each has a flag). adapt: the released run (200k steps, 5000 = 2.5% warm-up
# steps, then constant). sft/rm: the paper (3% warm-up, linear decay; sft 3 epochs, rm 1 epoch of
# batch 512); the sft batch is not given in the paper, 128 is Tulu 2's. ar: a usual small-model recipe.
# data: the dataset kinds a stage trains on; init: the checkpoints it starts from besides scratch
# (run_folder.checkpoint_kind); model: the architecture it trains, as its checkpoints' config.json says.
STAGES = {
    "adapt": dict(data=("tokens",), init=("lm", "diffusion"), lr=1e-5, schedule="constant", warmup=0.025,
                  batch_size=112, seq_len=2048, max_steps=200_000, loss_weighting="sequence",
                  model=dict(timestep_embed=True, causal=False)),
    "sft": dict(data=("spans",), init=("diffusion",), lr=1e-5, schedule="linear", warmup=0.03, batch_size=128,
                seq_len=2048, epochs=3.0, loss_weighting="sequence", model=dict(timestep_embed=True, causal=False)),
    "rm": dict(data=("pairs",), init=("lm", "reward"), lr=5e-6, schedule="linear", warmup=0.03, batch_size=512,
               seq_len=2048, epochs=1.0, loss_weighting="sequence",  # per pair
               model=dict(head="score", timestep_embed=False, causal=True)),
    "ar": dict(data=("tokens", "spans"), init=("lm",), lr=3e-4, schedule="cosine", warmup=0.03, batch_size=64,
               seq_len=1024, max_steps=5000, loss_weighting="token", model=dict(timestep_embed=False, causal=True)),
}
positive, non_negative = number(int, lo=1), number(int, lo=0)  # step counts and sizes; counts where 0 is off
positive_number, fraction = number(float, lo=0, lo_open=True), number(float, lo=0, hi=1, hi_open=True)  # [0, 1)


def parse_args(argv=None):
    p = ArgumentParser(prog="train.py", description="Train a TESS 2 stage (adapt, sft, rm) or an AR baseline.")
    arg = p.add_argument
    arg("--stage", required=True, choices=STAGES, help="what to train (see the top of train.py)")
    arg("--init", help="Hub id, Hugging Face folder, one of our step-XXXXXXX folders, or 'scratch'")
    arg("--preset", help="model preset for --init scratch (model.PRESETS: tiny, small, ...)")
    arg("--data", required=True, help="dataset folder made by a data/ prepare script")
    arg("--val-data", help="held-out dataset folder for the periodic eval loss")
    arg("--tokenizer", help="tokenizer folder copied into checkpoints (default: --init's, else the data's)")
    arg("--out", required=True, help="run folder: step-XXXXXXX checkpoints and log.jsonl (one trainer at a time)")
    arg("--resume", nargs="?", const="latest", help="continue from --out's latest checkpoint, or this one")
    arg("--discard-later", action="store_true", help="--resume STEP_DIR: move --out's later checkpoints aside")
    arg("--fallback", action="store_true", help="--resume: move unreadable latest checkpoints aside, use the last one")
    arg("--seq-len", type=number(int, lo=2), help="sequence length L: BOS and a target at least (default: per stage)")
    arg("--batch-size", type=positive, help="global batch in sequences, pairs for rm (default: per stage)")
    arg("--micro-batch-size", type=positive, default=1, help="sequences per process and forward pass")
    arg("--max-steps", type=positive, help="optimizer steps in all (default: per stage)")
    arg("--epochs", type=positive_number, help="set --max-steps from passes over --data")
    arg("--stop-at", type=positive, help="stop (and save) after this step; the LR still follows --max-steps")
    arg("--lr", type=positive_number, help="peak learning rate (default: per stage)")
    arg("--schedule", choices=("constant", "linear", "cosine"), help="after warm-up (cosine: to lr/10)")
    arg("--warmup-steps", type=non_negative, help="linear warm-up steps (default: 2.5%% of --max-steps, sft/rm/ar 3%%)")
    arg("--weight-decay", type=number(float, lo=0), default=0.0, help="AdamW weight decay of the matrices")
    arg("--adam-betas", type=fraction, nargs=2, default=[0.9, 0.999], help="AdamW beta1 beta2")
    arg("--grad-clip", type=number(float, lo=0), default=1.0, help="clip the global grad norm to this (0: off)")
    arg("--loss-weighting", choices=("sequence", "token"),
        help="sequence: each sequence's mean CE weighs the same (the released run; adapt, sft default); "
             "token: one mean over all targets of the global batch (ar default)")
    arg("--ul2-prefix", choices=("released", "paper"), default="released",
        help="adapt's prefix-LM objective: random prefix (released code) or half (paper)")
    arg("--overfit", action="store_true", help="train on the first global batch only (debugging)")
    arg("--seed", type=seed_flag, default=0, help="seeds data order, t, noise, masks and a scratch init")
    arg("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if present")
    arg("--dtype", choices=("bf16", "fp32"), help="compute dtype (default: bf16 on CUDA); weights stay fp32")
    arg("--fsdp", action="store_true", help="shard weights, gradients and AdamW state (FSDP2)")
    arg("--grad-ckpt", action="store_true", help="activation checkpointing per layer")
    arg("--lora", type=positive, help="LoRA rank r: adapters on the frozen --init (support/lora.py); the [PAD] "
        "row, the timestep embedding and a score head train whole; checkpoints in PEFT's layout")
    arg("--lora-alpha", type=positive_number, help="LoRA alpha: adapters scaled by alpha/r (default: 2 r)")
    arg("--lora-dropout", type=fraction, default=0.0, help="dropout on the adapters' input (masks depend on how a "
        "batch is split over processes and micro-batches; --resume stays exact)")
    arg("--lora-targets", nargs="+", choices=lora.TARGETS, default=list(lora.TARGETS), metavar="NAME",
        help=f"the block layers that get adapters (default: all, {' '.join(lora.TARGETS)})")
    arg("--eval-every", type=non_negative, default=0, help="eval on --val-data every N steps (0: at the end)")
    arg("--eval-batches", type=positive, default=10, help="global batches of --val-data per eval")
    arg("--save-every", type=positive, default=1000, help="checkpoint every N steps (and at the end)")
    arg("--keep-last", type=non_negative, default=0, help="keep only the last K checkpoints (0: all)")
    arg("--log-every", type=positive, default=1, help="print a log line every N steps")
    arg("--peak-tflops", type=positive_number, default=989.0, help="per-GPU peak for MFU (H100 bf16 dense: 989)")
    return check_args(p.parse_args(argv))


def check_args(args):
    """The stage's defaults filled in, and mistakes caught before anything is read or written (each
    message says what to pass instead); returns args."""
    for key in ("lr", "schedule", "batch_size", "seq_len", "loss_weighting"):
        if getattr(args, key) is None:
            setattr(args, key, STAGES[args.stage][key])
    if args.lora and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is visible here: pass --device cpu (or auto)")
    if args.fsdp and "RANK" not in os.environ:
        raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N")
    run_folder.check_checkpoint_flags(args.resume, args.init)
    if args.init == "scratch" and args.preset is None:
        raise ValueError("--init scratch needs --preset (e.g. tiny, small)")
    lora.check_flags(args.lora, args.lora_alpha, args.lora_dropout, args.init)
    if int(os.environ.get("RANK", 0)) == 0:  # the rank that will hold --out's lock
        run_folder.check_out(args.out)  # a file, unwritable, or held by another run: found before it is created
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


def print0(*values):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*values, flush=True)


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
    """A 63-bit generator seed for (run seed, global sample index, stream) in which every bit of all three
    matters: a hash, since packing them into one integer overflows the 64 bits a generator keeps."""
    digest = hashlib.blake2b(f"{seed},{n},{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def self_condition_coin(seed, n):
    """Sec. 3.1: sequence n is self-conditioned with probability 0.5 (the released run drew one coin per
    one-sequence micro-batch), whatever else shares its micro-batch."""
    return bool(torch.rand((), generator=torch.Generator().manual_seed(sample_seed(seed, n, 2))) < 0.5)


def make_batch(args, ds, keys):
    """The micro-batch of global sample indices `keys`, on the host. For the diffusion stages each
    sequence gets its timestep t and UL2 mask (stream 0), noise seed (stream 1) and self-conditioning
    coin (stream 2) from its index alone, so splitting a global batch over ranks and micro-batches
    changes nothing."""
    b = ds.batch([n % args.batch_size for n in keys] if args.overfit else keys, args.seq_len, args.seed)
    if args.stage in ("adapt", "sft"):
        gens = [torch.Generator().manual_seed(sample_seed(args.seed, n, 0)) for n in keys]
        b["t"] = torch.stack([torch.randint(tess2.NUM_TRAIN_STEPS, (), generator=g) for g in gens])  # (B,)
        if args.stage == "adapt":  # each sequence's mask from its generator, after its t
            b["span_mask"] = torch.stack([tess2.ul2_mask(args.seq_len, g, prefix=args.ul2_prefix) for g in gens])
        b["noise_seeds"] = [sample_seed(args.seed, n, 1) for n in keys]
        b["self_condition"] = torch.tensor([self_condition_coin(args.seed, n) for n in keys])  # (B,) bool
    return b


def row_targets(b):
    """(B,) loss terms per row: span positions j >= 1 (diffusion, METHOD.md §5), next-token targets
    (ar: all L-1, or span positions only on SFT data)."""
    if "span_mask" in b:
        return b["span_mask"][:, 1:].sum(1)
    return torch.full((b["ids"].size(0),), b["ids"].size(1) - 1)


def target_count(stage, b, weighting):
    """What a global batch's loss is divided by, summed over its micro-batches: pairs (rm), sequences
    with targets (sequence weighting: the loss sums per-sequence means) or targets (token weighting)."""
    if stage == "rm":
        return b["chosen"].size(0)
    n = row_targets(b)
    return int((n > 0).sum()) if weighting == "sequence" else int(n.sum())


class Objective(nn.Module):
    """The stage's loss summed over a micro-batch: per-sequence means (sequence weighting) or all
    terms (token weighting), to be divided by target_count over the global batch. DDP and FSDP
    wrap this module rather than the network, because the diffusion loss uses the embedding matrix
    and the LM head outside the network's forward (support/fused_loss.py); in here all weights are in place."""

    def __init__(self, net, stage, weighting):
        super().__init__()
        self.net, self.stage, self.weighting = net, stage, weighting  # weighting: "sequence" or "token"

    def forward(self, b):
        net, ids = self.net, b.get("ids")
        if self.stage in ("adapt", "sft"):
            # tess2.diffusion_loss's per-sequence sums weighted here, computed at span positions only
            counts = row_targets(b)  # (B,) span targets per row
            weights = 1 / counts.clamp(min=1) if self.weighting == "sequence" else torch.ones_like(counts)
            return fused_loss.diffusion_loss(net, ids, b["span_mask"], b["t"], b["noise_seeds"], b["self_condition"],
                                             weights, extra_pass=b.get("extra_pass", False))
        elif self.stage == "ar":
            logits = net(ids=ids, causal=True)[:, :-1]  # (B, L-1, V): position i predicts token i+1
            targets = ids[:, 1:].masked_fill(~b["span_mask"][:, 1:], -100) if "span_mask" in b else ids[:, 1:]
            sums = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="none").view(targets.shape).sum(1)  # (B,)
            counts = (targets != -100).sum(1)
        else:
            ids = torch.cat([b["chosen"], b["rejected"]])  # (2B, L): one pass for both sides
            rewards = net(ids=ids, causal=True, last_index=torch.cat([b["chosen_last"], b["rejected_last"]]))  # (2B,)
            r_chosen, r_rejected = rewards.float().chunk(2)
            return -F.logsigmoid(r_chosen - r_rejected).sum()  # Bradley-Terry
        return (sums / counts.clamp(min=1)).sum() if self.weighting == "sequence" else sums.sum()


# -----------------------------------------------------------------------------
# Training: data and model checked against each other, one step, the loop


def open_checked(path, stage, meta=None):
    ds = open_dataset(path)
    kinds = STAGES[stage]["data"]
    if ds.meta["kind"] not in kinds:
        raise ValueError(f"--stage {stage} trains on {' or '.join(kinds)} data, but {path} holds "
                         f"{ds.meta['kind']!r} data")
    if meta is not None and ds.meta["vocab_sha256"] != meta["vocab_sha256"]:
        raise ValueError(f"{path} was tokenized with {ds.meta['tokenizer']}, the training data with "
                         f"{meta['tokenizer']}: prepare both with the same tokenizer")
    return ds


def build_model(args, meta, init, device, sharded=False):
    """Returns (net, tokenizer source). init: 'scratch' (--preset, seeded by --seed) or a checkpoint
    (Hub id or folder), read with the stage's architecture (run_folder.load_model; sharded: FSDP2).
    --lora: the checkpoint frozen, with adapters (a LoRA run's checkpoint comes with its own)."""
    overrides = STAGES[args.stage]["model"]
    if init == "scratch":
        torch.manual_seed(args.seed)  # the same weights on every rank
        net = Transformer(preset(args.preset, vocab_size=meta["vocab_size"], **overrides)).init_weights()
        return net.to(device), None
    net, tokenizer = run_folder.load_model(init, meta, overrides, device, sharded, lora_run=bool(args.lora))
    if args.lora:
        lora.attach(net, init, args.lora, args.lora_alpha, args.lora_dropout, args.lora_targets, meta["pad_id"],
                    args.seed)
    return net, tokenizer


@dataclass
class TrainingRun:
    """What a run trains with, made and checked by prepare() before its first step."""
    ddp: bool                    # launched by torchrun: losses and gradients are summed over processes
    rank: int                    # this process among `world`
    world: int
    device: torch.device
    accum: int                   # micro-batches per process and step
    data: TokenDataset | SpanDataset | PairDataset  # --data
    val_data: TokenDataset | SpanDataset | PairDataset | None  # --val-data
    num_examples: int            # sequences (pairs) in --data at --seq-len: one epoch
    data_identity: dict          # --data's identity, saved in checkpoints and checked on --resume
    resume: str | None           # the checkpoint --resume continues (in --out), None: from --init
    start_step: int              # optimizer steps done before this process started
    net: Transformer
    objective: nn.Module         # Objective(net), wrapped by DDP or sharded by FSDP2
    optimizer: torch.optim.AdamW
    autocast: torch.autocast     # bf16 autocast (CUDA, no FSDP), else a disabled one
    checkpoint_files: dict       # saved in every checkpoint: tokenizer, generation_config.json


def wrap(args, net, ddp, device, bf16):
    """(objective, AdamW): FSDP2 shards every block and then the rest; DDP replicates."""
    objective = Objective(net, args.stage, args.loss_weighting)
    if args.fsdp:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
        for block in net.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(objective, mp_policy=mp)
        run_folder.read_shards(objective, net, device, args.seed)  # built on the meta device: each rank's rows
    elif ddp:
        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in objective.parameters() if p.requires_grad]  # under --lora, the adapters only
    opt = torch.optim.AdamW([dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
                             dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
                            lr=args.lr, betas=tuple(args.adam_betas), fused=device.type == "cuda")
    return objective, opt


def prepare(args, ddp, rank, world, device):
    """Everything a run needs, all checked before --out is written to: data, the checkpoint to start from
    (--resume's, else --init), model, objective, AdamW (restored on --resume), the step to start from."""
    accum, rem = divmod(args.batch_size, world * args.micro_batch_size)
    if rem or accum == 0:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of processes ({world}) x "
                         f"--micro-batch-size ({args.micro_batch_size})")
    ds = open_checked(args.data, args.stage)
    val = open_checked(args.val_data, args.stage, ds.meta) if args.val_data else None
    num_examples = ds.num_examples(args.seq_len)
    if num_examples == 0:
        raise ValueError(f"{args.data} has no example at --seq-len {args.seq_len}")
    stage = STAGES[args.stage]
    if args.max_steps is None:
        epochs = args.epochs or stage.get("epochs")
        args.max_steps = max(1, math.ceil(epochs * num_examples / args.batch_size)) if epochs else stage["max_steps"]
    if args.warmup_steps is None:
        args.warmup_steps = round(stage["warmup"] * args.max_steps)
    identity = run_folder.dataset_identity(args.data, ds)
    resume, folder, start = run_folder.resume_from(args, identity, rank, ddp)
    init = run_folder.check_start(args, ds.meta, folder, STAGES[args.stage]["init"])  # before any weights are read
    net, init_tokenizer = build_model(args, ds.meta, init, device, sharded=args.fsdp)
    if args.seq_len > net.args.max_length:
        raise ValueError(f"--seq-len {args.seq_len} is beyond what the model attends over ({net.args.max_length}, "
                         "max_position_embeddings / sliding_window): lower --seq-len")
    files = run_folder.checkpoint_files(args, ds.meta, init_tokenizer)
    net.gradient_checkpointing = args.grad_ckpt
    bf16 = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    objective, opt = wrap(args, net, ddp, device, bf16)
    run_folder.load_optimizer(folder, objective, opt, rank, ddp)
    return TrainingRun(ddp=ddp, rank=rank, world=world, device=device, accum=accum, data=ds, val_data=val,
                       num_examples=num_examples, data_identity=identity, resume=resume, start_step=start, net=net,
                       objective=objective, optimizer=opt, checkpoint_files=files,
                       autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not args.fsdp))


def step_loss(args, run, dataset, step, backward):
    """The global batch's loss, a device tensor: the sum over all micro-batches and ranks divided by the
    global target_count (sequences or targets), computed in one place. Nothing here waits for the device."""
    keys = [global_indices(step, m, run.rank, run.world, args.batch_size, args.micro_batch_size)
            for m in range(run.accum)]
    batches = [make_batch(args, dataset, k) for k in keys]
    count = torch.tensor(sum(target_count(args.stage, b, args.loss_weighting) for b in batches))
    count = all_sum(count.to(run.device, non_blocking=True), run.ddp).clamp(min=1)
    if args.fsdp and args.stage in ("adapt", "sft"):  # every rank gathers weights for the same passes
        for m, b in enumerate(batches):
            b["extra_pass"] = any(self_condition_coin(args.seed, n) for rank in range(run.world) for n in
                                  global_indices(step, m, rank, run.world, args.batch_size, args.micro_batch_size))
    total = torch.zeros((), device=run.device)
    for m, b in enumerate(batches):  # the coins stay on the host: no sync to ask if any row needs them
        b = {k: v.to(run.device, non_blocking=True) if torch.is_tensor(v) and k != "self_condition" else v
             for k, v in b.items()}
        if isinstance(run.objective, DDP):
            run.objective.require_backward_grad_sync = m == run.accum - 1  # all-reduce once per step
        if args.lora_dropout:  # LoRA's dropout masks from the micro-batch's first sample index: --resume repeats them
            torch.manual_seed(sample_seed(args.seed, keys[m][0], 3))
        with run.autocast:
            loss = run.objective(b)
        if backward:
            (loss * run.world / count).backward()  # DDP and FSDP average over ranks
        total += loss.detach().float()
    return all_sum(total, run.ddp) / count


def train_step(args, run, step):
    """One optimizer step; returns its log record."""
    t0 = time.time()
    lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss = step_loss(args, run, run.data, step, backward=True)
    norm = torch.nn.utils.clip_grad_norm_(run.objective.parameters(), args.grad_clip or math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
    loss, norm = torch.stack([loss, norm.float()]).tolist()  # the step's one wait for the device
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise FloatingPointError(f"step {step + 1}: loss {loss}, grad norm {norm}; stopped before the optimizer "
                                 "step and saved nothing. Lower --lr, check the data, or --resume from the last "
                                 "checkpoint")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    record = dict(step=step + 1, loss=loss, lr=lr, grad_norm=norm)
    return run_folder.with_speed(record, args, run.net, run.world, run.device, time.time() - t0)


def val_loss(args, run):
    """Held-out loss: the mean loss of --val-data's first --eval-batches global batches (the same each time)."""
    run.objective.eval()
    with torch.no_grad():
        total = sum(step_loss(args, run, run.val_data, i, backward=False) for i in range(args.eval_batches)).item()
    run.objective.train()
    return total / args.eval_batches


def train(args, run):
    last = min(args.max_steps, args.stop_at or args.max_steps)
    print0(f"{args.stage}: {run.net.num_params() / 1e6:.1f}M parameters, "
           f"{'FSDP2' if args.fsdp else 'DDP' if run.ddp else 'single'}, {run.world} process(es) x {run.accum} "
           f"micro-batches of {args.micro_batch_size}, steps {run.start_step} -> {last} of {args.max_steps}")
    for step in range(run.start_step, last):
        record = train_step(args, run, step)
        done = record["step"]
        run_folder.append_log(args.out, record, run.rank)
        if done % args.log_every == 0 or done == last:
            print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if run.val_data and ((args.eval_every and done % args.eval_every == 0) or done == args.max_steps):
            loss = val_loss(args, run)
            run_folder.append_log(args.out, dict(step=done, val_loss=loss), run.rank)
            print0(f"step {done}: val loss {loss:.4f}")
        if done % args.save_every == 0 or done == last:
            state = run_folder.train_state(args, done, run.num_examples, run.data_identity)
            run_folder.save_checkpoint(args, done, run.objective, run.net, run.optimizer,
                                       {**run.checkpoint_files, "train_state.json": state}, run.rank)


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world, device = compute_init(args.device)
    try:
        with run_folder.sole_trainer(args.out, rank, ddp) as take:  # an interruption leaves nothing
            run = prepare(args, ddp, rank, world, device)  # every check: a refused run has written nothing
            take()  # rank 0 holds --out (creating it), then makes it one history up to the run's start
            run_folder.begin(args, run.resume, run.start_step, rank)
            train(args, run)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, "train.py")
