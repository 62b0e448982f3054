"""
A compact Mistral-architecture transformer for TESS 2 and its Hugging Face checkpoints.

One network serves every role in the project:
  - the causal LM that TESS 2 starts from (Mistral-7B, Llama, our small AR models),
  - the bidirectional diffusion model (released `hamishivi/tess2`: adds `timestep_embed`, V = 32001),
  - the reward model (`hamishivi/tess_mistral_rm`: the LM head replaced by a scalar `score` head).

Parameter names are exactly Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
checkpoint loads by name with no conversion, and transformers loads what we save.
Mistral v0.1's 4096-token sliding window changes nothing up to that length (TESS 2 uses 2048);
longer inputs are refused rather than silently given full attention.
"""
import json
import os
import shutil
import tempfile
import typing
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from support.hub import TOKENIZER_FILES, read_config, read_json, resolve


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096
    tie_word_embeddings: bool = False
    model_type: str = "mistral"  # "mistral" or "llama": only the name written to config.json
    bos_token_id: int | None = 1  # carried through to config.json (Mistral: 1, 2; SmolLM2: 1, 2 or 0, 0)
    eos_token_id: int | list | None = 2
    # what TESS adds
    head: str = "lm"  # "lm": (B, T, V) logits; "score": one scalar per sequence (reward model)
    timestep_embed: bool = False  # Linear(1, D, bias=False) added to input embeddings (diffusion)
    causal: bool = True  # attention kind when forward() is not told (released config: is_causal)
    # self-conditioning of the diffusion model (released config names; tess2.predict reads them):
    # "logits_mean" mixes the previous prediction into the input (paper Eq. 8), None ignores it
    self_condition: str | None = "logits_mean"
    self_condition_mix_before_weights: bool = True  # False: the released forward never uses it

    def __post_init__(self):
        for f in fields(self):  # a config.json value of the wrong type fails here, by name
            value, kinds = getattr(self, f.name), typing.get_args(f.type) or (f.type,)
            if not any(isinstance(value, k) and not (k is int and isinstance(value, bool))
                       or (k is float and type(value) is int) for k in kinds):
                raise ValueError(f"config.json: {f.name} = {value!r} should be {getattr(f.type, '__name__', f.type)}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {self.head!r}")
        if self.self_condition not in (None, "logits_mean"):
            raise ValueError(f"self_condition {self.self_condition!r} is not supported: TESS 2 uses "
                             "'logits_mean' (paper Eq. 8), or null for none")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")

    @property
    def max_length(self) -> int:
        """The longest sequence this model reads: its positions, and no more than its sliding window
        (windowed attention is not implemented; Mistral v0.1's 4096 changes nothing below that)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @property
    def architecture(self) -> str:
        family = {"mistral": "Mistral", "llama": "Llama"}[self.model_type]
        if self.head == "score":
            return f"{family}ForSequenceClassification"
        return f"{family}ForDiffusionLM" if self.timestep_embed else f"{family}ForCausalLM"

    @classmethod
    def from_hf(cls, cfg: dict, **overrides) -> "ModelArgs":
        """Read a Hugging Face config.json dict (Mistral, Llama, or the released TESS 2)."""
        arch = (cfg.get("architectures") or ["MistralForCausalLM"])[0]
        known = ("MistralForCausalLM", "LlamaForCausalLM", "MistralForSequenceClassification",
                 "LlamaForSequenceClassification", "MistralForDiffusionLM", "LlamaForDiffusionLM",
                 "MistralforSequenceClassificationWithPadding")  # the released code's reward model class
        if arch not in known:
            raise ValueError(f"unknown architecture {arch!r} in config.json; this loader reads {', '.join(known)}")
        score = "SequenceClassification" in arch
        labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 1
        if score and labels != 1:
            raise ValueError(f"{arch} with {labels} labels: a reward model has one")
        args = {k: v for k, v in cfg.items() if k in {f.name for f in fields(cls)}}
        rope_cfg = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers >= 5 / Llama 3
        if rope_cfg.get("rope_type", rope_cfg.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {rope_cfg} is not supported: only plain RoPE (Mistral, Llama 2)")
        args["rope_theta"] = rope_cfg.get("rope_theta", cfg.get("rope_theta", 10000.0))
        args["model_type"] = "llama" if arch.startswith("Llama") else "mistral"
        args["head"] = "score" if score else "lm"
        # ours: timestep_embed, causal; the released code's config: disable_timestep_embed, is_causal
        diffusion = arch.endswith("ForDiffusionLM")
        args["timestep_embed"] = cfg.get("timestep_embed", diffusion and not cfg.get("disable_timestep_embed", False))
        args["causal"] = cfg.get("causal", cfg.get("is_causal", False) if diffusion else True)
        if args["model_type"] == "llama":
            args.setdefault("sliding_window", None)
        args.update(overrides)
        return cls(**args)

    def to_hf(self) -> dict:
        cfg = {k: v for k, v in asdict(self).items() if k not in ("head", "model_type")}
        cfg.update(architectures=[self.architecture], model_type=self.model_type, hidden_act="silu",
                   initializer_range=0.02, attention_dropout=0.0, use_cache=True,
                   rope_parameters=dict(rope_theta=self.rope_theta, rope_type="default"))
        if self.head == "score":
            cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        if self.model_type == "llama":
            cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
            cfg.pop("sliding_window")
        return cfg


# the CPU miniature (README, "TESS 2 in miniature"): a few million parameters
_SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=2048, sliding_window=None)
PRESETS = {
    # Mistral-7B-v0.1, the base of TESS 2
    "mistral-7b": dict(),
    # the released TESS 2 (hamishivi/tess2): Mistral-7B + [PAD] token + timestep embedding
    "tess2-7b": dict(vocab_size=32001, timestep_embed=True, causal=False),
    # SmolLM2-135M (Llama architecture), the real pretrained model of the miniature's SmolLM2 variant
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, max_position_embeddings=8192,
                         sliding_window=None, tie_word_embeddings=True, model_type="llama"),
    # a tiny model for tests and CPU experiments
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None),
    "small": _SMALL,
    # the miniature (eval/miniature.sh): a 4.9M-parameter model and a 0.9M reward
    # model, small enough to ship together in bf16 and to train on 2 CPU cores
    "shakespeare": dict(_SMALL, num_hidden_layers=4, max_position_embeddings=1024),
    "shakespeare-rm": dict(_SMALL, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# The network


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()  # in fp32 and cast back, as Mistral does (bf16 variance is too coarse)
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(T: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) in fp32, Hugging Face's half-split layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.nh, self.nkv, self.hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(a.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(a.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, a.hidden_size, bias=False)

    def forward(self, x, cos, sin, causal: bool, mask):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, nh, T, hd), (B, nkv, T, hd)
        # one fused call; with mask=None this is the flash kernel on CUDA (causal or not)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           enable_gqa=self.nh != self.nkv)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, causal: bool, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, causal, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.hidden_size),
            layers=nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers)),
            norm=RMSNorm(args.hidden_size, args.rms_norm_eps),
        ))
        if args.head == "lm":
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
            if args.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.score = nn.Linear(args.hidden_size, 1, bias=False)
        if args.timestep_embed:
            self.timestep_embed = nn.Linear(1, args.hidden_size, bias=False)
        self.gradient_checkpointing = False
        self.generation_config = None  # from_pretrained: the checkpoint's generation_config.json, if any

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch (normal(0, std), norms 1, timestep embedding 0)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name == "timestep_embed.weight":
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        return self

    def hidden_states(self, ids=None, embeds=None, t=None, causal: bool | None = None, key_padding_mask=None):
        """
        The final (normed) hidden states (B, T, D) of ids (B, T) token ids, or embeds (B, T, D).
        t (B,) or (B, T): scaled time in [0, 1) for the timestep embedding, per sequence or per
          position (0 adds nothing, so context positions can be given t = 0).
        causal: attention kind for this call (default: args.causal).
        key_padding_mask (B, T) bool, True = a real token that may be attended to.
        """
        x = self.model.embed_tokens(ids) if embeds is None else embeds  # (B, T, D)
        B, T, _ = x.shape
        a = self.args
        if a.sliding_window is not None and T > a.sliding_window:
            raise ValueError(f"sequence length {T} exceeds the sliding window {a.sliding_window}; "
                             "this implementation does not do windowed attention")
        if t is not None:
            if not a.timestep_embed:
                raise ValueError("t was given but this model has no timestep embedding; load it with "
                                 "timestep_embed=True (and causal=False) to adapt it to diffusion")
            t = t.to(x.dtype).reshape(B, -1, 1)  # (B, 1 or T, 1): a (B,) t must not broadcast along T
            x = x + self.timestep_embed(t)  # (B, T, D)
        causal = a.causal if causal is None else causal
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :].bool()  # (B, 1, 1, T)
            if causal:
                mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            # a padded query may see no key (left padding): a NaN row on CUDA's memory-efficient kernel
            # that then spreads. Each query sees itself (as transformers does); real rows are unchanged.
            mask = mask | torch.eye(T, dtype=torch.bool, device=x.device)  # (B, 1, T, T)
        cos, sin = rope(T, a.head_dim, a.rope_theta, x.device)
        for layer in self.model.layers:
            # recompute each block in backward: training, and reward guidance's gradient w.r.t. its input
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, causal, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, causal, mask)
        return self.model.norm(x)  # (B, T, D)

    def forward(self, ids=None, embeds=None, t=None, causal: bool | None = None, key_padding_mask=None,
                last_index=None):
        """hidden_states(...) through the head: (B, T, V) logits, or for the score head (B,) rewards
        read at last_index (B,) (default: the last position)."""
        x = self.hidden_states(ids, embeds, t, causal, key_padding_mask)  # (B, T, D)
        if self.args.head == "lm":
            return self.lm_head(x)  # (B, T, V)
        B = x.size(0)
        last = x[:, -1] if last_index is None else x[torch.arange(B, device=x.device), last_index]  # (B, D)
        return self.score(last).squeeze(-1)  # (B,)

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=None, device=None, verbose: bool = True,
                        **overrides) -> "Transformer":
        """
        Load a Hugging Face Mistral/Llama checkpoint (causal LM, sequence classifier, or the released
        TESS 2) from a local directory or a Hub repo id. Built on the meta device, then each tensor is
        read (pread, not mmap: mapped pages would count twice while converting) and cast to `dtype`
        (default fp32) on `device` in turn: loading peaks at one copy of the weights plus one tensor.
        overrides change the architecture on the way in: timestep_embed=True, causal=False adapts an AR
        model to diffusion (timestep_embed.weight = 0: at first the AR model's function); head="score"
        starts a reward model from an LM (score.weight ~ normal(0, 0.02), lm_head dropped). Both reported.
        """
        from safetensors import SafetensorError, safe_open
        path = resolve(name_or_path)
        args = ModelArgs.from_hf(read_config(path), **overrides)
        files = checkpoint_files(path)
        dtype, device = dtype or torch.float32, torch.device(device or "cpu")
        with torch.device("meta"):
            model = cls(args)
        tied = args.tie_word_embeddings and args.head == "lm"
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        state, ignored = {}, []
        for file in files:
            try:
                f = safe_open(file, framework="pt", device=str(device), backend="pread")
            except SafetensorError as e:  # the raw error does not say which file
                raise ValueError(f"{file} is not a readable safetensors file ({e}); it may be truncated "
                                 "by an interrupted download or copy: delete it and fetch it again") from e
            with f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints stored
                        continue
                    if name == "lm_head.weight" and name not in expected:  # head="score", or tied
                        ignored.append(name)
                        continue
                    if name not in expected:
                        raise ValueError(f"unexpected tensor {name!r} in {file}: not part of a "
                                         f"{args.architecture} with this config.json")
                    if name in state:
                        raise ValueError(f"tensor {name!r} appears twice, the second time in {file}")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise ValueError(f"tensor {name!r} in {file} has shape {shape}, expected "
                                         f"{expected[name]} from config.json")
                    state[name] = f.get_tensor(name).to(dtype)
        new = sorted(expected.keys() - state.keys())
        for name in new:
            state[name] = new_weight(name, expected[name], name_or_path).to(dtype=dtype, device=device)
        model.load_state_dict(state, strict=False, assign=True)
        gen = os.path.join(path, "generation_config.json")  # the checkpoint's sampling defaults (sample.py)
        model.generation_config = read_json(gen, "generation config") if os.path.exists(gen) else None
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        if verbose and (new or ignored):
            print(f"from_pretrained({name_or_path}): initialised new {new}; ignored {ignored}")
        return model

    def save_pretrained(self, out_dir: str, max_shard_bytes: int = 5 * 2**30,
                        tokenizer_from: str | None = None, extra_files: dict | None = None):
        """
        Write config.json + safetensors (sharded with an index above max_shard_bytes) in the Hugging
        Face layout, atomically: everything goes to a temporary directory that then replaces out_dir.
        tokenizer_from copies the tokenizer files of another checkpoint dir; extra_files maps file
        name -> object written beside the weights: JSON, or torch.save for a name ending in .pt.
        """
        from safetensors.torch import save_file
        out_dir = os.path.abspath(out_dir)
        parent, base = os.path.split(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{base}-", dir=parent)
        try:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            if self.args.tie_word_embeddings:
                state.pop("lm_head.weight", None)  # as transformers saves tied weights
            nbytes = lambda v: v.numel() * v.element_size()
            shards, size = [{}], 0
            for k, v in state.items():
                if shards[-1] and size + nbytes(v) > max_shard_bytes:
                    shards, size = shards + [{}], 0
                shards[-1][k], size = v, size + nbytes(v)
            n = len(shards)
            names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else [
                "model.safetensors"]
            for fname, shard in zip(names, shards):
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            if n > 1:
                _write_json(os.path.join(tmp, "model.safetensors.index.json"), {
                    "metadata": {"total_size": sum(map(nbytes, state.values()))},
                    "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard}})
            cfg = self.args.to_hf()
            cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
            _write_json(os.path.join(tmp, "config.json"), cfg)
            if tokenizer_from is not None:
                src = resolve(tokenizer_from)
                for fname in TOKENIZER_FILES:
                    if os.path.exists(os.path.join(src, fname)):
                        shutil.copy(os.path.join(src, fname), tmp)
            for fname, obj in (extra_files or {}).items():  # *.pt: torch.save (tensors, primitives); else JSON
                if fname.endswith(".pt"):
                    torch.save(obj, os.path.join(tmp, fname))
                else:
                    _write_json(os.path.join(tmp, fname), obj)
            for fname in os.listdir(tmp):  # like any file: safetensors writes 0600, mkdtemp makes 0700
                os.chmod(os.path.join(tmp, fname), 0o644)
            os.chmod(tmp, 0o755)
            if os.path.exists(out_dir):
                os.rename(out_dir, tmp + "-old")
            os.rename(tmp, out_dir)
            shutil.rmtree(tmp + "-old", ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


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


def new_weight(name: str, shape, source: str) -> torch.Tensor:
    """A tensor that adapting a checkpoint adds (fp32, CPU): the timestep embedding starts at 0, so
    the adapted model is at first the AR model; a new score head is drawn from N(0, 0.02).
    Any other missing tensor is an error."""
    if name not in ("timestep_embed.weight", "score.weight"):
        raise ValueError(f"checkpoint {source} is missing tensor {name!r}")
    w = torch.zeros(shape)
    return w.normal_(std=0.02) if name == "score.weight" else w


@torch.no_grad()
def load_sharded(model: Transformer, name_or_path: str, verbose: bool = True):
    """
    Read a checkpoint into a model whose parameters are already FSDP2 shards (fully_shard's Shard(0)
    DTensors, materialised with to_empty): each rank reads only its own rows of each tensor
    (safetensors' get_slice), so no rank ever holds the whole model. FSDP2 splits dim 0 as torch.chunk
    does: with n rows over W ranks, rank r holds rows [r c, r c + local) with c = ceil(n / W) (the
    last ranks fewer, or none). What from_pretrained makes (timestep_embed.weight = 0, score.weight ~
    N(0, 0.02)) is made the same way; rows of embed_tokens / lm_head beyond the checkpoint's (a grown
    vocabulary: [PAD]) are the mean of the checkpoint's rows, as train.grow_vocab makes them.
    """
    import torch.distributed as dist
    from safetensors import safe_open
    path = resolve(name_or_path)
    files = [safe_open(f, framework="pt", backend="pread") for f in checkpoint_files(path)]  # no mapped pages
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
        if name not in where:  # small: (D, 1) or (1, D), made whole as from_pretrained makes it
            local.copy_(new_weight(name, tuple(p.shape), name_or_path)[lo:hi])
            new.append(name)
            continue
        tensor = where[name].get_slice(name)
        shape = tuple(tensor.get_shape())
        grown = name in ("model.embed_tokens.weight", "lm_head.weight") and shape[0] < n
        if shape != tuple(p.shape) and not (grown and shape[1:] == tuple(p.shape[1:])):
            raise ValueError(f"tensor {name!r} has shape {shape} in {name_or_path}, expected {tuple(p.shape)}")
        rows = min(hi, shape[0]) - lo  # rows of this shard that are in the file
        if rows > 0:
            local[:rows].copy_(tensor[lo:lo + rows])
        if grown:  # the new rows: the mean of all old rows, summed shard by shard
            total = local[:max(rows, 0)].double().sum(0)
            dist.all_reduce(total)
            local[max(rows, 0):] = (total / shape[0]).to(local.dtype)
    if verbose and rank == 0 and new:
        print(f"load_sharded({name_or_path}): initialised new {new}")
    return model
