"""
The base families model.py reads besides Mistral v0.1 and Llama 2: Qwen2 and Qwen2.5 (q/k/v biases,
tied or untied embeddings), Qwen3 (per-head RMSNorm of q and k, a head_dim apart from the hidden
size), Llama 3.x (RoPE scaling "llama3"), Mistral v0.3, and a declared sliding window. One model
class; the differences are ModelArgs fields read from config.json.

transformers is the oracle: on tiny random configs our logits equal its ...ForCausalLM's (fp32),
its checkpoints load in ours and ours in it, and a base adapted to diffusion (timestep embedding,
bidirectional attention, the [PAD] row) computes what the same adaptation written out on the
transformers model computes.
"""
import copy
import json

import pytest
import torch
import transformers
from torch.testing import assert_close

import tess2
from conftest import randomize_
from support import run_folder
from model import PRESETS, ModelArgs, Transformer, attention_mask, preset

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32
SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)  # at head_dim 16, some frequencies kept, some blended, some divided

# id -> (transformers class, config beyond SMALL, what our ModelArgs must read from it)
FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM", dict(rope_theta=1e6, rms_norm_eps=1e-6),
              dict(model_type="qwen2", qkv_bias=True, o_bias=False, qk_norm=False, tie_word_embeddings=False)),
    "qwen2.5-tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1),
                     dict(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32, rope_theta=1e6),  # 4 heads of 32 on a hidden size of 64
              dict(model_type="qwen3", qk_norm=True, head_dim=32, qkv_bias=False, o_bias=False)),
    "qwen3-bias-tied": ("Qwen3ForCausalLM", dict(head_dim=8, attention_bias=True, tie_word_embeddings=True),
                        dict(model_type="qwen3", qk_norm=True, head_dim=8, qkv_bias=True, o_bias=True)),
    "llama3.1": ("LlamaForCausalLM", dict(rope_theta=5e5, rope_scaling=LLAMA3_ROPE),
                 dict(model_type="llama", rope_theta=5e5, rope_scaling=LLAMA3_ROPE, sliding_window=None)),
    "llama3.2-tied": ("LlamaForCausalLM", dict(head_dim=32, tie_word_embeddings=True,
                                               rope_scaling=dict(LLAMA3_ROPE, factor=32.0)),
                      dict(model_type="llama", head_dim=32, rope_scaling=dict(LLAMA3_ROPE, factor=32.0))),
    "mistral-v0.3": ("MistralForCausalLM", dict(vocab_size=32768, rope_theta=1e6, sliding_window=None),
                     dict(model_type="mistral", vocab_size=32768, sliding_window=None)),
}


def hf_model(arch, seed=0, **cfg):
    """A tiny random transformers model; every weight random (norms and biases too), so that a
    weight read into the wrong place cannot go unnoticed."""
    cfg = copy.deepcopy({**SMALL, **cfg})  # transformers writes rope_theta into the rope_scaling dict it is given
    config = transformers.AutoConfig.for_model(getattr(transformers, arch).config_class.model_type, **cfg)
    torch.manual_seed(seed)
    return randomize_(getattr(transformers, arch)(config).eval())


def randomise(m: Transformer, seed=0) -> Transformer:
    """Our model with every weight random, as hf_model's."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return m.eval()


def ids_for(vocab, B=2, T=12, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def padded(ids):
    """(B, T) bool: row 0 has 4 pads at the end, row 1 none."""
    real = torch.ones_like(ids, dtype=torch.bool)
    real[0, -4:] = False
    return real


# -----------------------------------------------------------------------------
# logits and checkpoints both ways


@pytest.mark.parametrize("family", FAMILIES)
def test_their_checkpoint_loads_in_ours_with_equal_logits(tmp_path, family):
    arch, cfg, fields = FAMILIES[family]
    hf = hf_model(arch, **cfg)
    hf.save_pretrained(tmp_path / "ckpt")
    ours = Transformer.from_pretrained(str(tmp_path / "ckpt"), verbose=False).eval()
    assert {k: getattr(ours.args, k) for k in fields} == fields
    ids = ids_for(ours.args.vocab_size)
    real = padded(ids)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, **TOL)
        # rows of different lengths: the masked call, K/V repeated to every head (GQA families)
        out = ours(ids, key_padding_mask=real)
        assert_close(out[real], hf(ids, attention_mask=real.long()).logits[real], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_our_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, family):
    arch, cfg, fields = FAMILIES[family]
    args = ModelArgs.from_hf(hf_model(arch, **cfg).config.to_dict())
    ours = randomise(Transformer(args))
    ours.save_pretrained(tmp_path / "ckpt", max_shard_bytes=100_000)
    saved = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert saved["architectures"] == [arch] and ModelArgs.from_hf(saved) == ours.args
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(hf).__name__ == arch
    assert hf.config.rope_parameters["rope_type"] == (cfg.get("rope_scaling") or {}).get("rope_type", "default")
    ids = ids_for(args.vocab_size)
    with torch.no_grad():
        assert_close(hf(ids).logits, ours(ids), **TOL)


def test_tied_qwen_embeddings_stay_tied_through_save_and_load(tmp_path):
    ours = randomise(Transformer(preset("tiny", model_type="qwen2", qkv_bias=True, tie_word_embeddings=True)))
    ours.save_pretrained(tmp_path / "ckpt")
    again = Transformer.from_pretrained(str(tmp_path / "ckpt"))
    assert again.lm_head.weight is again.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, ours.lm_head.weight)
    assert torch.equal(again.model.layers[1].self_attn.k_proj.bias, ours.model.layers[1].self_attn.k_proj.bias)


def test_what_a_family_cannot_say_is_refused_on_save_and_on_load():
    with pytest.raises(ValueError, match=r"MistralForCausalLM config.json cannot say \{'qk_norm': True\}"):
        ModelArgs(qk_norm=True).to_hf()
    with pytest.raises(ValueError, match=r"LlamaForCausalLM config.json cannot say \{'sliding_window': 64\}"):
        preset("tiny", model_type="llama", sliding_window=64).to_hf()
    with pytest.raises(ValueError, match="rope scaling .*'yarn'.* not supported"):
        ModelArgs.from_hf(dict(architectures=["Qwen2ForCausalLM"], rope_scaling=dict(rope_type="yarn", factor=4.0)))
    with pytest.raises(ValueError, match="unknown architecture 'Qwen2MoeForCausalLM'"):
        ModelArgs.from_hf(dict(architectures=["Qwen2MoeForCausalLM"]))


# -----------------------------------------------------------------------------
# the sliding window: honoured with a mask when the input is longer than it


def test_attention_mask_is_the_written_out_rule():
    """Query i sees key j when: causal -> j <= i; windowed -> |i - j| < window; padded -> j is real,
    or j == i (a padded query sees itself, so no row is empty)."""
    T, W = 7, 3
    real = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    for causal in (True, False):
        for window in (None, W):
            for padding in (None, real):
                mask = attention_mask(T, causal, window, padding, "cpu")
                if window is None and padding is None:
                    assert mask is None  # SDPA's is_causal (or nothing) says it all
                    continue
                for b in range(mask.size(0)):
                    expected = torch.tensor([[(j <= i or not causal) and (window is None or abs(i - j) < W)
                                              and (padding is None or bool(padding[b, j])) or (padding is not None and i == j)
                                              for j in range(T)] for i in range(T)])
                    assert torch.equal(mask[b, 0], expected), (causal, window, padding is not None, b)
    assert attention_mask(T, True, T, None, "cpu") is None  # not longer than the window: no mask


@pytest.mark.parametrize("arch, cfg", [
    ("MistralForCausalLM", dict(sliding_window=4)),
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
], ids=["mistral", "qwen2"])
def test_sliding_window_logits_match_transformers(tmp_path, arch, cfg):
    hf = hf_model(arch, **cfg)
    hf.save_pretrained(tmp_path / "ckpt")
    ours = Transformer.from_pretrained(str(tmp_path / "ckpt"), verbose=False).eval()
    assert ours.args.sliding_window == 4 and ours.args.max_length == 256
    ids = ids_for(101)
    with torch.no_grad():
        out = ours(ids)
        assert_close(out, hf(ids).logits, **TOL)
        ours.args.sliding_window = None
        assert_close(ours(ids)[:, :4], out[:, :4], **TOL)  # within the window nothing changes
        assert not torch.allclose(ours(ids), out, atol=1e-3)  # past it the window matters


def test_qwen_layers_with_and_without_a_window_are_refused():
    cfg = dict(architectures=["Qwen2ForCausalLM"], num_hidden_layers=4, use_sliding_window=True,
               sliding_window=8, max_window_layers=2)
    with pytest.raises(ValueError, match="one kind for all"):
        ModelArgs.from_hf(cfg)
    assert ModelArgs.from_hf({**cfg, "max_window_layers": 4}).sliding_window is None  # no layer slides
    assert ModelArgs.from_hf({**cfg, "use_sliding_window": False}).sliding_window is None  # Qwen2.5's configs


# -----------------------------------------------------------------------------
# adaptation to diffusion


@pytest.mark.parametrize("family", ["qwen3", "llama3.2-tied", "qwen2"])
def test_adapted_base_runs_predict_as_the_same_adaptation_of_transformers_model(tmp_path, family):
    """from_pretrained(timestep_embed=True, causal=False) + run_folder.grow_vocab ([PAD] = the mean row), then
    tess2.predict equals transformers' model fed by hand what predict feeds: p = (softmax(S_t) + 1/V) / 2
    (Eq. 8 with no previous prediction), h = p @ E at span positions and E[w] at context, t * w_time
    added at span positions, no causal mask, the LM head with the [PAD] row, shifted by one position."""
    arch, cfg, _ = FAMILIES[family]
    hf = hf_model(arch, **cfg)
    hf.save_pretrained(tmp_path / "ar")
    ours = Transformer.from_pretrained(str(tmp_path / "ar"), timestep_embed=True, causal=False, verbose=False).eval()
    V = ours.args.vocab_size
    run_folder.grow_vocab(ours, V + 1)
    E_hf, W_hf = hf.model.embed_tokens.weight, hf.lm_head.weight  # (V, D)
    E = torch.cat([E_hf, E_hf.mean(0, keepdim=True)])  # (V + 1, D)
    W = torch.cat([W_hf, W_hf.mean(0, keepdim=True)])
    assert torch.equal(ours.embed_tokens.weight, E) and torch.equal(ours.lm_head.weight, W)
    with torch.no_grad():
        ours.timestep_embed.weight.normal_()  # (D, 1), as after training: the t path must count

    B, T = 2, 12
    ids = ids_for(V + 1, B, T)
    span = torch.arange(T) >= 5  # context 0..4, span 5..11
    span = span.expand(B, T)
    S_t = 5 * torch.randn(B, T, V + 1, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        logits = tess2.predict(ours, ids, span, S_t, t)
        p = (torch.softmax(S_t, -1) + 1 / (V + 1)) / 2
        h = torch.where(span[..., None], p @ E, E[ids]) + (t[:, None] * span)[..., None] * ours.timestep_embed.weight[:, 0]
        hidden = hf.model(inputs_embeds=h, attention_mask=torch.zeros(B, 1, T, T)).last_hidden_state  # (B, T, D)
        expected = torch.cat([torch.zeros(B, 1, V + 1), (hidden @ W.T)[:, :-1]], dim=1)
    assert_close(logits, expected, **TOL)

    ours.save_pretrained(tmp_path / "tess")
    assert json.load(open(tmp_path / "tess" / "config.json"))["architectures"] == [arch.replace("CausalLM", "DiffusionLM")]
    again = Transformer.from_pretrained(str(tmp_path / "tess"), verbose=False)
    assert again.args == ours.args and not again.args.causal and again.args.vocab_size == V + 1


# -----------------------------------------------------------------------------
# presets


# parameter counts of the released checkpoints (their model cards and safetensors metadata)
PUBLISHED = {"mistral-7b": 7_241_732_096, "mistral-7b-v0.3": 7_248_023_552, "qwen2.5-0.5b": 494_032_768,
             "qwen2.5-3b": 3_085_938_688, "qwen2.5-7b": 7_615_616_512, "llama3.1-8b": 8_030_261_248,
             "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824, "smollm2-135m": 134_515_008}
# Qwen3's model cards give rounded totals and non-embedding counts (billions)
ROUNDED = {"qwen3-0.6b": (0.6, 0.44), "qwen3-4b": (4.0, 3.6), "qwen3-8b": (8.2, 6.95)}


@pytest.mark.parametrize("name", [*PUBLISHED, *ROUNDED])
def test_presets_have_the_released_parameter_counts_and_a_config_transformers_builds(name):
    args = preset(name)
    with torch.device("meta"):
        ours = Transformer(args)
    n = ours.num_params()
    if name in PUBLISHED:
        assert n == PUBLISHED[name]
    else:
        total, non_embedding = ROUNDED[name]
        embedding = args.vocab_size * args.hidden_size * (1 if args.tie_word_embeddings else 2)
        digits = len(str(non_embedding).split(".")[1])
        assert (round(n / 1e9, 1), round((n - embedding) / 1e9, digits)) == (total, non_embedding)
    with torch.device("meta"):  # transformers builds the same tensors from the config.json we would write
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**args.to_hf()))
    assert type(hf).__name__ == args.architecture
    assert {k: v.shape for k, v in hf.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_every_preset_writes_a_config_that_reads_back_as_itself():
    for name in PRESETS:
        assert ModelArgs.from_hf(preset(name).to_hf()) == preset(name), name
