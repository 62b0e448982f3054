"""
One transformer for TESS 2 and the Hugging Face checkpoints it starts from. It serves every role:
  - the causal LM that TESS 2 adapts (Mistral-7B, Llama 2 and 3, Qwen2/2.5, Qwen3, our small AR models),
  - the bidirectional diffusion model (released `hamishivi/tess2`: adds `timestep_embed`, V = 32001),
  - the reward model (`hamishivi/tess_mistral_rm`: the LM head replaced by a scalar `score` head).
The families differ only in ModelArgs fields read from config.json: q/k/v biases (Qwen2), per-head
q/k norms and a free head_dim (Qwen3), Llama 3's RoPE scaling, a sliding window (Mistral v0.1).
Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...): checkpoints load by name
both ways. The files themselves (config.json dialects, safetensors, shards) are support/checkpoint.py's.
"""
import math
import os
import typing
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from support import lora
from support.checkpoint import (FAMILIES, LLAMA3_ROPE, args_from_config, config_from_args,  # noqa: F401 (re-exports)
                                load_sharded, new_weight, read_tensors, save_checkpoint)
from support.hub import read_config, read_json, resolve


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
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen3 sets its own)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.x: {"rope_type": "llama3", *LLAMA3_ROPE}
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096  # each query sees the keys closer than this (Mistral v0.1)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q, k, v (Qwen2; Llama and Qwen3 with attention_bias)
    o_bias: bool = False  # a bias on o_proj (Llama and Qwen3 with attention_bias)
    qk_norm: bool = False  # each head's q and k RMS-normalised before RoPE (Qwen3)
    model_type: str = "mistral"  # the family, a key of FAMILIES
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
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {', '.join(FAMILIES)}")
        scaling = self.rope_scaling
        if scaling is not None and (scaling.get("rope_type"), set(scaling)) != ("llama3", {"rope_type", *LLAMA3_ROPE}):
            raise ValueError(f"rope_scaling {scaling} should be Llama 3's: rope_type 'llama3' and {LLAMA3_ROPE}")
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
        """The longest sequence this model reads (a sliding window is honoured, not a limit)."""
        return self.max_position_embeddings

    @property
    def architecture(self) -> str:
        kind = "ForDiffusionLM" if self.timestep_embed else "ForCausalLM"
        return FAMILIES[self.model_type] + ("ForSequenceClassification" if self.head == "score" else kind)

    @classmethod
    def from_hf(cls, cfg: dict, **overrides) -> "ModelArgs":
        """Read a Hugging Face config.json dict (a family in FAMILIES, or the released TESS 2)."""
        return cls(**{**args_from_config(cfg, {f.name for f in fields(cls)}), **overrides})

    def to_hf(self) -> dict:
        """The config.json transformers reads for this family; an arg it cannot say is an error."""
        cfg = config_from_args(asdict(self), self.architecture)
        back = ModelArgs.from_hf(cfg)
        wrong = {f.name: getattr(self, f.name) for f in fields(self) if getattr(back, f.name) != getattr(self, f.name)}
        if wrong:
            raise ValueError(f"a {self.architecture} config.json cannot say {wrong}")
        return cfg


# the CPU miniature (docs/miniature.md): a few million parameters
_SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=2048, sliding_window=None)
# the families' common values, from the public config.json of each model named below
_QWEN2 = dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6, sliding_window=None,
              bos_token_id=151643, eos_token_id=151643)
_QWEN3 = dict(model_type="qwen3", qk_norm=True, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, sliding_window=None,
              vocab_size=151936, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rope_theta=5e5, max_position_embeddings=131072,
               sliding_window=None, bos_token_id=128000, eos_token_id=128001)
_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)  # and a factor: 8 (Llama 3.1), 32 (Llama 3.2)
PRESETS = {
    # Mistral-7B-v0.1, the base of TESS 2
    "mistral-7b": dict(),
    # the released TESS 2 (hamishivi/tess2): Mistral-7B + [PAD] token + timestep embedding
    "tess2-7b": dict(vocab_size=32001, timestep_embed=True, causal=False),
    "mistral-7b-v0.3": dict(vocab_size=32768, rope_theta=1e6, sliding_window=None),
    "qwen2.5-0.5b": dict(_QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(_QWEN2, vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8),
    "llama3.1-8b": dict(_LLAMA3, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0)),
    "llama3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                        tie_word_embeddings=True, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        tie_word_embeddings=True, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
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


def rope(T: int, a: ModelArgs, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) in fp32, Hugging Face's half-split layout. Llama 3's scaling
    divides the frequencies whose wavelength exceeds original_max_position_embeddings / low_freq_factor
    by `factor`, keeps those below ... / high_freq_factor, and blends linearly in 1 / wavelength between."""
    inv_freq = 1.0 / a.rope_theta ** (torch.arange(0, a.head_dim, 2, device=device, dtype=torch.float32) / a.head_dim)
    if a.rope_scaling is not None:
        s = a.rope_scaling
        turns = s["original_max_position_embeddings"] * inv_freq / (2 * math.pi)  # original context / wavelength
        kept = ((turns - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        inv_freq = (1 - kept) * inv_freq / s["factor"] + kept * inv_freq  # (hd/2,)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def attention_mask(T: int, causal: bool, window: int | None, key_padding_mask, device):
    """
    None when SDPA needs no mask (its is_causal flag, or nothing, says it all: the flash kernel),
    else a (B or 1, 1, T, T) bool mask, True = may attend. key_padding_mask (B, T) bool marks real
    tokens. A sliding window lets query i see key j only when |i - j| < window: causal, the window
    keys up to itself (Mistral's); bidirectional, as far on each side.
    """
    windowed = window is not None and T > window
    if key_padding_mask is None and not windowed:
        return None
    pos = torch.arange(T, device=device)
    gap = pos[:, None] - pos[None, :]  # (T, T): query position - key position
    mask = ((gap >= 0) if causal else torch.ones_like(gap, dtype=torch.bool))[None, None]  # (1, 1, T, T)
    if windowed:
        mask = mask & (gap.abs() < window)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()  # (B, 1, T, T)
        # a padded query may see no key (left padding): a NaN row on CUDA's memory-efficient kernel
        # that then spreads. Each query sees itself (as transformers does); real rows are unchanged.
        mask = mask | torch.eye(T, dtype=torch.bool, device=device)
    return mask


def attend(q, k, v, mask, is_causal: bool):
    """SDPA of q (B, nh, T, hd) over k, v (B, nkv, T, hd) -> (B, nh, T, hd). With a mask, k and v are
    first repeated to all nh heads: a mask with grouped K/V (enable_gqa) rules out CUDA's flash and
    memory-efficient kernels, and SDPA would silently run the math one, (B, nh, T, T) scores in fp32."""
    groups = q.size(1) // k.size(1)
    if mask is not None and groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, T, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=k.size(1) != q.size(1))


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.nh, self.nkv, self.hd, self.qk_norm = a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.qk_norm
        self.q_proj = nn.Linear(a.hidden_size, self.nh * self.hd, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, self.nkv * self.hd, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, self.nkv * self.hd, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:  # one (hd,) weight each, shared by all heads
            self.q_norm, self.k_norm = RMSNorm(self.hd, a.rms_norm_eps), RMSNorm(self.hd, a.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal: bool):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.hd) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, T, heads, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, mask, is_causal)  # (B, nh, T, hd)
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

    def forward(self, x, cos, sin, mask, is_causal: bool):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal)
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
    def embed_tokens(self) -> nn.Module:  # nn.Embedding (lora.TokenRows under LoRA)
        return self.model.embed_tokens

    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch (normal(0, std), norms 1, biases and timestep embedding 0)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name == "timestep_embed.weight" or name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        return self

    def hidden_states(self, ids=None, embeds=None, t=None, causal: bool | None = None, key_padding_mask=None):
        """The final (normed) hidden states (B, T, D) of ids (B, T) token ids, or embeds (B, T, D). t (B,) or
        (B, T): scaled time in [0, 1) for the timestep embedding, per sequence or per position (0 adds
        nothing: context positions get t = 0). causal: this call's attention kind (default args.causal).
        key_padding_mask (B, T) bool, True = a real token that may be attended to."""
        x = self.model.embed_tokens(ids) if embeds is None else embeds  # (B, T, D)
        B, T, _ = x.shape
        a = self.args
        if t is not None:
            if not a.timestep_embed:
                raise ValueError("t was given but this model has no timestep embedding; load it with "
                                 "timestep_embed=True (and causal=False) to adapt it to diffusion")
            t = t.to(x.dtype).reshape(B, -1, 1)  # (B, 1 or T, 1): a (B,) t must not broadcast along T
            x = x + self.timestep_embed(t)  # (B, T, D)
        causal = a.causal if causal is None else causal
        mask = attention_mask(T, causal, a.sliding_window, key_padding_mask, x.device)  # None or (B or 1, 1, T, T)
        is_causal = causal and mask is None  # else the mask holds the causal rule
        cos, sin = rope(T, a, x.device)
        for layer in self.model.layers:
            # recompute each block in backward: training, and reward guidance's gradient w.r.t. its input
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, is_causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal)
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
    # Hugging Face checkpoints (the file handling: support/checkpoint.py)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=None, device=None, verbose: bool = True,
                        **overrides) -> "Transformer":
        """Load a Hugging Face checkpoint (a FAMILIES causal LM or sequence classifier, the released TESS 2,
        or a LoRA adapter folder) from a directory or Hub repo id: built on the meta device, each tensor
        read and cast to dtype (default fp32) on device in turn, so loading peaks at one copy of the weights
        plus one tensor. overrides change the architecture on the way in: timestep_embed=True, causal=False
        adapts an AR model to diffusion (timestep_embed.weight = 0: at first the AR model); head="score"
        starts a reward model from an LM (score.weight ~ N(0, 0.02), lm_head dropped). Both reported."""
        path = resolve(name_or_path)
        if lora.is_adapter(path):  # its base, then the adapter (support/lora.py)
            return lora.load_adapter(cls, path, dtype, device, verbose, **overrides)
        args = ModelArgs.from_hf(read_config(path), **overrides)
        dtype, device = dtype or torch.float32, torch.device(device or "cpu")
        with torch.device("meta"):
            model = cls(args)
        tied = args.tie_word_embeddings and args.head == "lm"
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        state, ignored = read_tensors(path, expected, dtype, device, args.architecture)
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
        """Write config.json + safetensors in the Hugging Face layout, atomically (support.checkpoint.
        save_checkpoint: sharding, tokenizer_from, extra_files). Tied weights are stored once."""
        if hasattr(self, "adapter"):  # LoRA: the adapters only, in PEFT's layout (support/lora.py)
            return lora.save_adapter(self, out_dir, tokenizer_from, extra_files)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.args.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # as transformers saves tied weights
        cfg = self.args.to_hf()
        cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        save_checkpoint(out_dir, state, cfg, max_shard_bytes, tokenizer_from, extra_files)
