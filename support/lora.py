"""
LoRA for model.Transformer, in PEFT's file layout, so that a frozen base and small adapters can
adapt a 7B model on one GPU (weights, gradients and AdamW state of the adapters only).

  - LoRALinear: a target nn.Linear becomes W x + b + (alpha / r) B A dropout(x) (Hu et al., 2021),
    W and b frozen, A (r, in) Kaiming-uniform and B (out, r) zero as PEFT draws them, so the adapted
    model starts as the base.
  - TokenRows: what adaptation adds to the vocabulary trains whole: the rows `index` of the frozen
    embedding (and of an untied LM head), the [PAD] row. They are their own (n, D) parameter and the
    weight is the frozen matrix with those rows replaced: PEFT's trainable tokens
    (`trainable_token_indices`). A full trainable embedding (PEFT's modules_to_save) would also
    train the [PAD] row, but at SmolLM2-135M's size it is a fifth of the model in gradients, AdamW
    state and adapter file, and at Mistral-7B's 0.5 GB per matrix; a gradient mask on the whole
    matrix costs the same memory. n x D parameters cost nothing.
  - Modules that adaptation creates (the timestep embedding, a reward model's score head) train
    whole: PEFT's `modules_to_save`.

A saved adapter is a folder: adapter_config.json (PEFT's fields, the base named in
base_model_name_or_path), adapter_model.safetensors (PEFT's key names:
base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...), and config.json, the adapted
model's architecture (timestep embedding, attention, head, vocabulary with [PAD]), which sample.py
and the other tools read as for any checkpoint. Transformer.from_pretrained(adapter_folder) loads
the base and applies the adapter; `python -m support.lora merge ADAPTER OUT` writes a plain checkpoint.
"""
import argparse
import hashlib
import math
import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.checkpoint import open_safetensors, save_checkpoint
from support.cli import run_cli
from support.hub import is_hub_id, read_config, read_json, resolve

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every Linear of a block
PREFIX = "base_model.model."  # PEFT's key prefix: its wrapper's .base_model (LoraModel) .model (ours)
# adapter_config.json fields whose non-default values change the computation and are not done here
# (null is read as the default too)
UNSUPPORTED = dict(use_dora=False, use_rslora=False, bias="none", fan_in_fan_out=False, rank_pattern={},
                   alpha_pattern={}, layers_to_transform=None, layer_replication=None, lora_bias=False,
                   target_parameters=None, exclude_modules=None, use_qalora=False, alora_invocation_tokens=None,
                   use_bdlora=None, kasa_config=None, monteclora_config=None, arrow_config=None)


def whole(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor: gathered, so every process must call), else p."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) B A dropout(x) for x (..., in): base (out, in) frozen, A (r, in), B (out, r)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer, self.scaling = base, alpha / r
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # (init_adapters draws A, B)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """The plain layer W + (alpha / r) B A (the same bias)."""
        base = self.base_layer
        with torch.no_grad():
            base.weight += self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)
        return base


class TokenRows(nn.Module):
    """An embedding or LM head whose rows `index` train as `rows` (n, D) and the rest stay frozen: its
    weight is the frozen (V, D) matrix with those rows replaced (a copy each time it is read; no
    gradient reaches the frozen rows). `rows` given: shared with the tied embedding."""

    def __init__(self, base: nn.Embedding | nn.Linear, index: list[int], rows: nn.Parameter | None = None):
        super().__init__()
        self.base_layer, self.index = base, list(index)  # a list: no buffer for the meta device to lose
        self.rows = rows if rows is not None else nn.Parameter(base.weight.detach()[self.index].clone())

    @property
    def weight(self) -> torch.Tensor:  # (V, D)
        w = self.base_layer.weight
        return w.index_copy(0, torch.tensor(self.index, device=w.device), self.rows)

    def forward(self, x):
        if isinstance(self.base_layer, nn.Embedding):
            return F.embedding(x, self.weight)  # (B, T) ids -> (B, T, D)
        return F.linear(x, self.weight)  # (..., D) -> (..., V)

    def merged(self):
        """The plain layer with the trained rows written in."""
        with torch.no_grad():
            self.base_layer.weight[self.index] = self.rows  # (n, D) into rows `index`
        return self.base_layer


# -----------------------------------------------------------------------------
# Adapting a model


def pad_rows(net, pad_id: int) -> dict:
    """The trainable_token_indices that train the [PAD] row of the embedding and of an untied LM head."""
    untied_head = net.args.head == "lm" and not net.args.tie_word_embeddings
    return {"embed_tokens": [pad_id], **({"lm_head": [pad_id]} if untied_head else {})}


def apply_lora(net, base: str, r: int, alpha: float, dropout: float = 0.0, targets=TARGETS, token_rows=None,
               seed: int = 0):
    """
    Freeze net and add adapters in place; returns net. base: the checkpoint the adapter applies to
    (adapter_config.json's base_model_name_or_path). targets: the block Linears that get LoRA.
    token_rows {"embed_tokens": ids, "lm_head": ids} (pad_rows): rows that train whole; with tied
    embeddings, the LM head's rows are the embedding's. The timestep embedding and a score head train
    whole. Adapters are drawn by init_adapters(net, seed) (on the meta device: later, by the caller).
    """
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got {r}, {alpha}, {dropout}")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA target modules {unknown or 'none'}: choose among {', '.join(TARGETS)}")
    token_rows = {k: list(dict.fromkeys(v)) for k, v in (token_rows or {}).items() if v}  # PEFT's order: the rows
    V = net.args.vocab_size
    if set(token_rows) - {"embed_tokens", "lm_head"} or any(not 0 <= i < V for v in token_rows.values() for i in v):
        raise ValueError(f"trainable token rows {token_rows}: embed_tokens or lm_head rows in [0, {V})")
    net.requires_grad_(False)
    for block in net.model.layers:
        for holder in (block.self_attn, block.mlp):
            for name in targets:
                if hasattr(holder, name):
                    setattr(holder, name, LoRALinear(getattr(holder, name), r, alpha, dropout))
    if "embed_tokens" in token_rows:
        net.model.embed_tokens = TokenRows(net.model.embed_tokens, token_rows["embed_tokens"])
    tied = net.args.head == "lm" and net.args.tie_word_embeddings
    if tied and "embed_tokens" in token_rows:  # one matrix: the head reads the same trained rows
        net.lm_head = TokenRows(net.lm_head, token_rows["embed_tokens"], rows=net.model.embed_tokens.rows)
    elif "lm_head" in token_rows:
        if tied or net.args.head != "lm":
            raise ValueError("trainable lm_head rows need an untied LM head; tied, name embed_tokens rows")
        net.lm_head = TokenRows(net.lm_head, token_rows["lm_head"])
    whole = [name for name in ("timestep_embed", "score") if hasattr(net, name)]
    for name in whole:
        getattr(net, name).requires_grad_(True)
    net.adapter = dict(base_model_name_or_path=base, peft_type="LORA", r=r, lora_alpha=alpha, lora_dropout=dropout,
                       target_modules=list(targets), trainable_token_indices=token_rows or None,
                       modules_to_save=whole or None, task_type="SEQ_CLS" if net.args.head == "score" else "CAUSAL_LM",
                       inference_mode=True, init_lora_weights=True, **UNSUPPORTED)
    if net.model.embed_tokens.weight.device.type != "meta":
        init_adapters(net, seed)
    return net


def check_flags(r, alpha, dropout, init):
    """train.py's LoRA flags against each other and --init, before anything is read."""
    if not r and (alpha is not None or dropout):
        raise ValueError("--lora-alpha and --lora-dropout set LoRA's adapters: pass --lora R as well")
    if r and init == "scratch":
        raise ValueError("--lora adapts a pretrained model: pass --init a checkpoint folder or Hub id, not scratch")


def attach(net, init: str, r: int, alpha: float, dropout: float, targets, pad_id: int, seed: int):
    """train.py --lora R on the model read from the checkpoint `init`: new adapters on it (frozen), or,
    if it came with adapters (a LoRA run's checkpoint), those, if they are the ones asked for. Prints
    what trains; returns net."""
    if not hasattr(net, "adapter"):
        base = init if is_hub_id(init) else os.path.abspath(init)  # found from any folder
        apply_lora(net, base, r, alpha, dropout, targets, pad_rows(net, pad_id), seed=seed)
    else:
        ad, asked = net.adapter, dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
        if any(ad[k] != v for k, v in asked.items()):
            raise ValueError(f"{init} holds LoRA adapters {({k: ad[k] for k in asked})}, not {asked}: pass its "
                             f"flags, or merge it (python -m support.lora merge {init} MERGED) and pass --init MERGED")
    if int(os.environ.get("RANK", 0)) == 0:
        trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
        print(f"LoRA r={r} alpha={alpha} on {' '.join(targets)}: {trained:,} trained parameters of "
              f"{net.num_params():,}", flush=True)
    return net


def init_adapters(net, seed: int):
    """A Kaiming-uniform as PEFT draws it (from a generator of (seed, layer name): the same on every
    process and however the model is sharded), B zero, trainable rows = the base's rows. Works on
    FSDP2's sharded parameters too (each process keeps its part of the whole tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def assign(p, value):  # value: the whole tensor, the same on every process
        with torch.no_grad():
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(value.to(p.device), p.device_mesh, p.placements).to_local())
            else:
                p.copy_(value)
    for name, module in net.named_modules():
        if isinstance(module, LoRALinear):
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(f"{seed},{name}".encode(),
                                                                             digest_size=8).digest(), "little") >> 1)
            A = nn.init.kaiming_uniform_(torch.empty(module.lora_A.weight.shape), a=math.sqrt(5), generator=g)
            assign(module.lora_A.weight, A.to(module.lora_A.weight.dtype))  # (r, in): PEFT's and nn.Linear's draw
            assign(module.lora_B.weight, torch.zeros(module.lora_B.weight.shape, dtype=module.lora_B.weight.dtype))
        elif isinstance(module, TokenRows):
            assign(module.rows, whole(module.base_layer.weight.detach())[module.index])


def merge(net):
    """Write the adapters into the weights: net becomes a plain model (every weight trainable, as
    from_pretrained makes it) that computes what the adapted one did. In place; returns net."""
    for name, module in list(net.named_modules()):
        if isinstance(module, (LoRALinear, TokenRows)):
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent), attr, module.merged())
    if net.args.head == "lm" and net.args.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    del net.adapter
    return net.requires_grad_(True)


# -----------------------------------------------------------------------------
# PEFT's layout


def adapter_params(net) -> dict:
    """{PEFT key: our parameter} of what the adapter trains (a tied LM head's rows are the embedding's)."""
    params = {}
    for name, module in net.named_modules():
        if isinstance(module, LoRALinear):
            params[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
            params[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
        elif isinstance(module, TokenRows) and not (name == "lm_head" and net.args.tie_word_embeddings):
            params[f"{PREFIX}{name}.token_adapter.trainable_tokens_delta"] = module.rows
    for name in net.adapter["modules_to_save"] or []:
        params[f"{PREFIX}{name}.weight"] = getattr(net, name).weight
    return params


def adapter_state(net) -> dict:
    """{PEFT key: whole CPU tensor} of the adapter; under FSDP2 every process must call it (it gathers)."""
    return {k: whole(p.detach()).contiguous().cpu() for k, p in adapter_params(net).items()}


def save_adapter(net, out_dir: str, tokenizer_from: str | None = None, extra_files: dict | None = None,
                 state: dict | None = None):
    """adapter_config.json + adapter_model.safetensors + config.json (the adapted architecture), atomically.
    state: adapter_state(net), if already gathered."""
    state = adapter_state(net) if state is None else state
    cfg = net.args.to_hf()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    save_checkpoint(out_dir, state, cfg, tokenizer_from=tokenizer_from, extra_files=extra_files,
                    adapter_config=net.adapter)


def is_adapter(path: str) -> bool:
    """Whether the checkpoint folder `path` holds a LoRA adapter rather than whole weights."""
    return os.path.exists(os.path.join(path, "adapter_config.json"))


def read_adapter_config(path: str) -> dict:
    """adapter_config.json, checked: a LoRA adapter this module computes as PEFT does."""
    ad = read_json(os.path.join(path, "adapter_config.json"), "adapter config")
    if ad.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {ad.get('peft_type')!r} is not supported; only LORA adapters are")
    changed = {k: ad[k] for k, v in UNSUPPORTED.items() if ad.get(k) not in (None, v)}
    if changed:
        raise ValueError(f"{path}: adapter_config.json sets {changed}, which this LoRA does not implement")
    targets = ad.get("target_modules")
    if isinstance(targets, str):  # PEFT: a regular expression, or "all-linear"
        targets = list(TARGETS) if targets == "all-linear" else [t for t in TARGETS if t == targets]
    if not targets or not ad.get("base_model_name_or_path"):
        raise ValueError(f"{path}: adapter_config.json needs base_model_name_or_path and a list of target_modules")
    rows = ad.get("trainable_token_indices") or {}
    if isinstance(rows, list):  # PEFT: a list means the input embedding
        rows = {"embed_tokens": rows}
    rows = {k.rpartition(".")[2]: v for k, v in rows.items()}  # "model.embed_tokens" -> "embed_tokens"
    saved = [m for m in ad.get("modules_to_save") or [] if m != "classifier"]  # PEFT adds "classifier" for SEQ_CLS
    return dict(ad, target_modules=targets, trainable_token_indices=rows, modules_to_save=saved,
                lora_dropout=ad.get("lora_dropout", 0.0))


def load_adapter(cls, path: str, dtype=None, device=None, verbose: bool = True, **overrides):
    """cls.from_pretrained of an adapter folder: the base named in adapter_config.json, built as the
    adapted architecture (the folder's config.json, else the base's; then overrides), with the adapter
    applied. Vocabulary rows the base lacks ([PAD]) must be rows the adapter trains."""
    from model import ModelArgs
    ad = read_adapter_config(path)
    base = ad["base_model_name_or_path"]
    base_cfg = read_config(resolve(base))
    own = os.path.exists(os.path.join(path, "config.json"))
    score = ad.get("task_type") == "SEQ_CLS"
    head = {"head": "score"} if score else {}
    args = ModelArgs.from_hf(read_config(path) if own else base_cfg, **head, **overrides)
    base_vocab = ModelArgs.from_hf(base_cfg).vocab_size
    shape = {k: v for k, v in asdict(args).items() if k != "vocab_size"}
    net = cls.from_pretrained(base, dtype=dtype, device=device, verbose=False, **shape)
    if args.vocab_size != base_vocab:
        grow(net, args.vocab_size, ad["trainable_token_indices"], path)
    apply_lora(net, base, ad["r"], ad["lora_alpha"], ad["lora_dropout"], ad["target_modules"],
               ad["trainable_token_indices"])
    net.adapter["modules_to_save"] = [m for m in ad["modules_to_save"] if hasattr(net, m)] or None
    load_adapter_tensors(net, path)
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):
        net.generation_config = read_json(gen, "generation config")
    if verbose:
        print(f"from_pretrained({path}): LoRA r={ad['r']} alpha={ad['lora_alpha']} on {ad['target_modules']} of {base}")
    return net


def grow(net, vocab_size: int, token_rows: dict, path: str):
    """Append zero rows to the embedding and LM head for ids the base lacks, which the adapter supplies."""
    old = net.args.vocab_size
    new = set(range(old, vocab_size))
    for key in ["embed_tokens"] + (["lm_head"] if net.args.head == "lm" and not net.args.tie_word_embeddings else []):
        if vocab_size < old or not new <= set(token_rows.get(key, [])):
            raise ValueError(f"{path}: config.json has {vocab_size} token ids and the base {old}, but the adapter "
                             f"does not train {key} rows {sorted(new)}: not an adapter of this base")
    modules = [net.model.embed_tokens] + ([net.lm_head] if net.args.head == "lm" else [])
    for mod in modules:
        w = mod.weight  # (V_old, D)
        mod.weight = nn.Parameter(torch.cat([w.detach(), w.new_zeros(vocab_size - old, w.size(1))]))
    net.args.vocab_size = net.model.embed_tokens.num_embeddings = vocab_size
    if net.args.head == "lm":
        net.lm_head.out_features = vocab_size
        if net.args.tie_word_embeddings:
            net.lm_head.weight = net.model.embed_tokens.weight


def load_adapter_tensors(net, path: str):
    """adapter_model.safetensors into the adapted net: every key, each of its shape, nothing else."""
    params = adapter_params(net)
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} has adapter_config.json but no adapter_model.safetensors")
    with open_safetensors(file) as f:
        stored = {k.replace(".default.", "."): k for k in f.keys()}  # some PEFT versions keep the adapter name
        if stored.keys() != params.keys():
            missing, unexpected = sorted(params.keys() - stored.keys()), sorted(stored.keys() - params.keys())
            raise ValueError(f"{file} does not match adapter_config.json: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        with torch.no_grad():
            for key, p in params.items():
                tensor = f.get_tensor(stored[key])
                if tensor.shape != p.shape:
                    raise ValueError(f"{file}: {key} has shape {tuple(tensor.shape)}, expected {tuple(p.shape)}")
                p.copy_(tensor)


# -----------------------------------------------------------------------------
# python -m support.lora merge ADAPTER OUT


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m support.lora", description="Merge a LoRA adapter into its base.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="write base + adapter as a plain checkpoint (config.json + model.safetensors)")
    m.add_argument("adapter", help="folder with adapter_config.json (a LoRA run's step-XXXXXXX checkpoint)")
    m.add_argument("out", help="folder to write the merged checkpoint to")
    args = p.parse_args(argv)
    from model import Transformer
    if not os.path.exists(os.path.join(args.adapter, "adapter_config.json")):
        raise ValueError(f"{args.adapter} has no adapter_config.json: not a LoRA adapter folder")
    if os.path.abspath(args.out) == os.path.abspath(args.adapter):
        raise ValueError("the merged checkpoint would replace the adapter: choose another output folder")
    net = merge(Transformer.from_pretrained(args.adapter))
    gen = os.path.join(args.adapter, "generation_config.json")
    has_tok = os.path.exists(os.path.join(args.adapter, "tokenizer.json"))
    net.save_pretrained(args.out, tokenizer_from=args.adapter if has_tok else None,
                        extra_files={"generation_config.json": read_json(gen)} if os.path.exists(gen) else None)
    print(f"merged {args.adapter} into {args.out}")


if __name__ == "__main__":
    run_cli(main, "python -m support.lora")
