"""
Checkpoint files in the Hugging Face layout, for model.py: each family's config.json dialect,
finding a checkpoint's safetensors (one file, or shards named by model.safetensors.index.json),
reading tensors into place one at a time, writing a checkpoint atomically, and FSDP2's sharded load
where each rank reads only its own rows. What the tensors mean is model.py's business.
"""
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager

import torch

from support.hub import TOKENIZER_FILES, read_json, resolve


def write_json(path, obj):
    with disk_errors(path), open(path, "w") as f:
        json.dump(obj, f, indent=2)


@contextmanager
def disk_errors(path):
    """A failed write raised as the OSError behind it, naming `path`: torch.save reports a full disk as a
    RuntimeError ("unexpected pos") whose context is the file object's OSError, safetensors as a
    SafetensorError that says "os error 28", and a file's write() or close() without the file's name."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from e
        raise
    except Exception as e:
        found = re.search(r"os error (\d+)", str(e))
        code = e.__context__.errno if isinstance(e.__context__, OSError) else int(found.group(1)) if found else None
        if code is None:
            raise
        raise OSError(code, os.strerror(code), path) from e


# -----------------------------------------------------------------------------
# config.json: the families' ways of saying model.ModelArgs

FAMILIES = {"mistral": "Mistral", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}  # model_type -> class prefix
KINDS = ("ForCausalLM", "ForSequenceClassification", "ForDiffusionLM")  # ForDiffusionLM: TESS 2's own
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def args_from_config(cfg: dict, names: set) -> dict:
    """model.ModelArgs keyword arguments (of those in `names`) from a config.json dict: a family's
    fixed choices (Qwen2's q/k/v biases, Qwen3's q/k norms), its RoPE and sliding window, the head
    the architecture names, and the released TESS 2 flags (is_causal, disable_timestep_embed)."""
    arch = (cfg.get("architectures") or [FAMILIES.get(cfg.get("model_type"), "Mistral") + "ForCausalLM"])[0]
    arch = {"MistralforSequenceClassificationWithPadding": "MistralForSequenceClassification"}.get(arch, arch)
    known = [prefix + kind for prefix in FAMILIES.values() for kind in KINDS]  # (and the released RM's name)
    if arch not in known:
        raise ValueError(f"unknown architecture {arch!r} in config.json; this loader reads {', '.join(known)}")
    family = next(t for t, prefix in FAMILIES.items() if arch.startswith(prefix + "For"))
    labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 1
    if arch.endswith("SequenceClassification") and labels != 1:
        raise ValueError(f"{arch} with {labels} labels: a reward model has one")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias (Llama's biases in the MLP) is not supported")
    args = {k: v for k, v in cfg.items() if k in names}
    bias = family in ("llama", "qwen3") and bool(cfg.get("attention_bias"))  # q, k, v and o
    args.update(_rope(cfg), model_type=family, sliding_window=_window(cfg, family),
                qkv_bias=family == "qwen2" or bias, o_bias=bias, qk_norm=family == "qwen3",
                head="score" if arch.endswith("SequenceClassification") else "lm")
    # ours: timestep_embed, causal; the released code's config: disable_timestep_embed, is_causal
    diffusion = arch.endswith("ForDiffusionLM")
    args["timestep_embed"] = cfg.get("timestep_embed", diffusion and not cfg.get("disable_timestep_embed", False))
    args["causal"] = cfg.get("causal", cfg.get("is_causal", False) if diffusion else True)
    return args


def config_from_args(args: dict, architecture: str) -> dict:
    """The config.json of model.ModelArgs fields `args` in their family's dialect (transformers' keys
    plus TESS 2's: timestep_embed, causal, self_condition...)."""
    family = args["model_type"]
    cfg = {k: v for k, v in args.items() if k not in ("head", "qkv_bias", "o_bias", "qk_norm", "sliding_window")}
    cfg.update(architectures=[architecture], hidden_act="silu", initializer_range=0.02, attention_dropout=0.0,
               use_cache=True, rope_parameters=dict(args["rope_scaling"] or dict(rope_type="default"),
                                                    rope_theta=args["rope_theta"]))
    if args["head"] == "score":
        cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if family == "mistral":
        cfg["sliding_window"] = args["sliding_window"]
    if family in ("qwen2", "qwen3"):  # max_window_layers 0: the window, if any, in every layer
        cfg.update(use_sliding_window=args["sliding_window"] is not None, sliding_window=args["sliding_window"],
                   max_window_layers=0)
    if family in ("llama", "qwen3"):
        cfg.update(attention_bias=args["qkv_bias"], mlp_bias=False)
    return cfg


def _rope(cfg: dict) -> dict:
    """rope_theta and rope_scaling (transformers >= 5 writes rope_parameters; before, rope_scaling)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling=None)
    if kind != "llama3" or any(k not in rope for k in LLAMA3_ROPE):
        raise ValueError(f"rope scaling {rope} is not supported: plain RoPE and Llama 3's 'llama3' ({LLAMA3_ROPE}) are")
    return dict(rope_theta=theta, rope_scaling=dict(rope_type="llama3", **{k: rope[k] for k in LLAMA3_ROPE}))


def _window(cfg: dict, family: str) -> int | None:
    """The sliding window every layer has, or None. Llama has none. Qwen2/3 slide only with
    use_sliding_window, in layers from max_window_layers on (transformers >= 5 lists layer_types)."""
    if family in ("mistral", "llama"):
        return cfg.get("sliding_window", 4096) if family == "mistral" else None  # MistralConfig's default
    window, first = cfg.get("sliding_window"), cfg.get("max_window_layers", 28)
    slides = cfg.get("use_sliding_window", False) and window is not None
    layers = cfg.get("layer_types") or ["sliding_attention" if slides and i >= first else "full_attention"
                                        for i in range(cfg.get("num_hidden_layers", 32))]
    if len(set(layers)) > 1:
        raise ValueError(f"layers with and without a sliding window ({layers}) are not supported: one kind for all")
    return window if layers[0] == "sliding_attention" else None


# -----------------------------------------------------------------------------
# safetensors files


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory: one file, or the shards its index names."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        names = sorted(set(read_json(index, "shard index")["weight_map"].values()))
        missing = [n for n in names if not os.path.exists(os.path.join(path, n))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {missing}")
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
        raise ValueError(f"{path} holds only pickle checkpoints (.bin/.pt), which can run arbitrary code "
                         "when loaded and are refused here. Convert once with transformers: "
                         "AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)")
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json "
                            "(Hub repos that hold only pickle .bin weights are not read)")


def open_safetensors(file: str, device: str = "cpu"):
    """safe_open read with pread, not mmap: mapped pages would count twice while converting."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(file, framework="pt", device=device, backend="pread")
    except SafetensorError as e:  # the raw error does not say which file
        raise ValueError(f"{file} is not a readable safetensors file ({e}); it may be truncated "
                         "by an interrupted download or copy: delete it and fetch it again") from e


def read_tensors(path: str, expected: dict, dtype, device, architecture: str):
    """
    The tensors of the checkpoint directory `path` that `expected` names (name -> shape), each read
    and cast to dtype on device in turn: reading peaks at what is returned plus one tensor.
    Returns (state, ignored): a stored lm_head.weight that is not expected (a score head, or tied
    embeddings) is ignored; any other unknown, repeated or misshapen tensor is an error.
    """
    state, ignored = {}, []
    for file in checkpoint_files(path):
        with open_safetensors(file, str(device)) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints stored
                    continue
                if name == "lm_head.weight" and name not in expected:
                    ignored.append(name)
                    continue
                if name not in expected:
                    raise ValueError(f"unexpected tensor {name!r} in {file}: not part of a "
                                     f"{architecture} with this config.json")
                if name in state:
                    raise ValueError(f"tensor {name!r} appears twice, the second time in {file}")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ValueError(f"tensor {name!r} in {file} has shape {shape}, expected "
                                     f"{expected[name]} from config.json")
                state[name] = f.get_tensor(name).to(dtype)
    return state, ignored


def new_weight(name: str, shape, source: str) -> torch.Tensor:
    """A tensor that adapting a checkpoint adds (fp32, CPU): the timestep embedding starts at 0, so
    the adapted model is at first the AR model; a new score head is drawn from N(0, 0.02).
    Any other missing tensor is an error."""
    if name not in ("timestep_embed.weight", "score.weight"):
        raise ValueError(f"checkpoint {source} is missing tensor {name!r}")
    w = torch.zeros(shape)
    return w.normal_(std=0.02) if name == "score.weight" else w


def _shards(state: dict, max_shard_bytes: int) -> dict:
    """{file name: tensors} in state's order, a new shard whenever the next tensor would overflow."""
    nbytes = lambda v: v.numel() * v.element_size()
    shards, size = [{}], 0
    for k, v in state.items():
        if shards[-1] and size + nbytes(v) > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][k], size = v, size + nbytes(v)
    n = len(shards)
    if n == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards, 1)}


def _write_files(folder, state, config, max_shard_bytes, tokenizer_from, extra_files, adapter_config):
    from safetensors.torch import save_file
    shards = {"adapter_model.safetensors": state} if adapter_config else _shards(state, max_shard_bytes)
    for fname, shard in shards.items():
        with disk_errors(os.path.join(folder, fname)):
            save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
    if len(shards) > 1:
        write_json(os.path.join(folder, "model.safetensors.index.json"), {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
            "weight_map": {k: fname for fname, shard in shards.items() for k in shard}})
    write_json(os.path.join(folder, "config.json"), config)
    if adapter_config:
        write_json(os.path.join(folder, "adapter_config.json"), adapter_config)
    if tokenizer_from is not None:
        src = resolve(tokenizer_from)
        for fname in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, fname)):
                shutil.copy(os.path.join(src, fname), folder)
    for fname, obj in (extra_files or {}).items():  # *.pt: torch.save (tensors, primitives); else JSON
        if fname.endswith(".pt"):  # through a file object, so that a failed write is an OSError (disk_errors)
            with disk_errors(os.path.join(folder, fname)), open(os.path.join(folder, fname), "wb") as f:
                torch.save(obj, f)
        else:
            write_json(os.path.join(folder, fname), obj)


def save_checkpoint(out_dir: str, state: dict, config: dict, max_shard_bytes: int = 5 * 2**30,
                    tokenizer_from: str | None = None, extra_files: dict | None = None,
                    adapter_config: dict | None = None):
    """
    Write config.json + safetensors (sharded with an index above max_shard_bytes) atomically:
    everything goes to a temporary directory that then takes out_dir's place in one step (exchange),
    so a save interrupted anywhere leaves the old checkpoint or the new one under its name, whole.
    tokenizer_from copies the tokenizer files of another checkpoint; extra_files maps file name ->
    object: JSON, or torch.save for a name ending in .pt. adapter_config (a LoRA adapter,
    support/lora.py): state goes to adapter_model.safetensors, unsharded, and adapter_config.json is
    written beside config.json.
    """
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{base}-", dir=parent)
    try:
        _write_files(tmp, state, config, max_shard_bytes, tokenizer_from, extra_files, adapter_config)
        for fname in os.listdir(tmp):  # like any file: safetensors writes 0600, mkdtemp makes 0700
            os.chmod(os.path.join(tmp, fname), 0o644)
        os.chmod(tmp, 0o755)
        if not (os.path.exists(out_dir) and exchange(tmp, out_dir)):
            _rename_into_place(tmp, out_dir)
    finally:  # this save's folder if it failed; after an exchange, the previous checkpoint
        shutil.rmtree(tmp, ignore_errors=True)


RENAME_EXCHANGE, AT_FDCWD = 2, -100  # <linux/fs.h>, <fcntl.h>


def exchange(a: str, b: str) -> bool:
    """Swaps the folders a and b in one step, so that neither name is ever missing: Linux's
    renameat2(RENAME_EXCHANGE) through ctypes (glibc >= 2.28). False where that is unavailable (another
    OS, an older glibc or kernel, a file system without it); then nothing has moved."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # the kernel or the file system cannot exchange
        return False
    raise OSError(code, os.strerror(code), a, None, b)


def _rename_into_place(tmp: str, out_dir: str):
    """The fallback where exchange() is unavailable: out_dir moved aside to TMP-old, then tmp renamed in.
    Between the two renames no folder is named out_dir: a failure there renames the old one back, but
    a SIGKILL leaves it at TMP-old (support/run_folder.clean puts a step-XXXXXXX folder back; for any
    other folder, rename TMP-old back by hand)."""
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    os.rename(out_dir, tmp + "-old")
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(tmp + "-old", out_dir)
        raise
    shutil.rmtree(tmp + "-old", ignore_errors=True)


@torch.no_grad()
def load_sharded(model, name_or_path: str, verbose: bool = True):
    """
    Read a checkpoint into a model whose parameters are already FSDP2 shards (fully_shard's Shard(0)
    DTensors, materialised with to_empty): each rank reads only its own rows of each tensor
    (safetensors' get_slice), so no rank ever holds the whole model. FSDP2 splits dim 0 as torch.chunk
    does: with n rows over W ranks, rank r holds rows [r c, r c + local) with c = ceil(n / W) (the
    last ranks fewer, or none). What from_pretrained makes (timestep_embed.weight = 0, score.weight ~
    N(0, 0.02)) is made the same way; rows of embed_tokens / lm_head beyond the checkpoint's (a grown
    vocabulary: [PAD]) are the mean of the checkpoint's rows, as run_folder.grow_vocab makes them.
    A model with LoRA adapters (support/lora.py) reads its frozen layers from the checkpoint (or, given
    an adapter folder, from its base) and its adapters from the adapter folder; new adapters are left
    for lora.init_adapters.
    """
    import torch.distributed as dist
    path = resolve(name_or_path)
    adapter = {}  # a LoRA adapter folder (support/lora.py): the base's tensors from its base, the rest from it
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from support.lora import adapter_params
        keys = {id(p): k for k, p in adapter_params(model).items()}
        stored = open_safetensors(os.path.join(path, "adapter_model.safetensors"))
        adapter = {name: (stored, keys[id(p)]) for name, p in model.named_parameters() if id(p) in keys}
        path = resolve(read_json(os.path.join(path, "adapter_config.json"))["base_model_name_or_path"])
    files = [open_safetensors(f) for f in checkpoint_files(path)]
    where = {name: f for f in files for name in f.keys()}
    rank, world = dist.get_rank(), dist.get_world_size()
    new = []
    for name, p in model.named_parameters():  # a tied lm_head.weight is embed_tokens.weight, listed once
        local, n = p.to_local(), p.shape[0]  # local (rows here, ...) of the global (n, ...)
        lo = min(rank * -(-n // world), n)
        hi = lo + local.shape[0]
        if hi > n or (hi < n and local.shape[0] != -(-n // world)):
            raise RuntimeError(f"{name}: rank {rank} holds {local.shape[0]} of {n} rows, not torch.chunk's "
                               "split: this torch's FSDP2 lays out shards in another way")
        base_name = name.replace(".base_layer.", ".")  # a LoRA-wrapped layer's frozen weight
        if name in adapter:
            f, key = adapter[name]
            _read_rows(name, f.get_slice(key), local, lo, tuple(p.shape), name_or_path)
        elif name.endswith((".lora_A.weight", ".lora_B.weight", ".rows")):
            continue  # a new adapter: lora.init_adapters draws it once the base is in place
        elif base_name not in where:  # small: (D, 1) or (1, D), made whole as from_pretrained makes it
            local.copy_(new_weight(name, tuple(p.shape), name_or_path)[lo:hi])
            new.append(name)
        else:
            _read_rows(base_name, where[base_name].get_slice(base_name), local, lo, tuple(p.shape), name_or_path)
    if verbose and rank == 0 and new:
        print(f"load_sharded({name_or_path}): initialised new {new}")
    return model


def _read_rows(name, tensor, local, lo, shape, source):
    """Rows [lo, lo + len(local)) of the stored `tensor` into `local`; embedding or head rows past
    the stored ones (a grown vocabulary) get the mean of all stored rows, summed across ranks."""
    import torch.distributed as dist
    stored = tuple(tensor.get_shape())
    grown = name in ("model.embed_tokens.weight", "lm_head.weight") and stored[0] < shape[0]
    if stored != shape and not (grown and stored[1:] == shape[1:]):
        raise ValueError(f"tensor {name!r} has shape {stored} in {source}, expected {shape}")
    rows = min(lo + local.shape[0], stored[0]) - lo  # rows of this shard that are in the file
    if rows > 0:
        local[:rows].copy_(tensor[lo:lo + rows])
    if grown:  # the new rows: the mean of all old rows, summed shard by shard
        total = local[:max(rows, 0)].double().sum(0)
        dist.all_reduce(total)
        local[max(rows, 0):] = (total / stored[0]).to(local.dtype)
