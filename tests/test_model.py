"""
model.py: the network behind every role in TESS 2 (causal LM, bidirectional diffusion model,
reward model) and its Hugging Face checkpoints.

transformers is the oracle here and nowhere else: our logits must equal MistralForCausalLM's,
and checkpoints must pass both ways between the two. Every checkpoint is tiny, random, and
written to a temporary directory laid out like a Hub repo (config.json + *.safetensors).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import model as M
from conftest import randomize_, word_tokenizer
from support.checkpoint import write_json
from support.hub import resolve
from model import ModelArgs, Transformer, preset
from support.tokenizer import Tokenizer

TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 parity


# -----------------------------------------------------------------------------
# helpers: tiny random checkpoints


def hf_model(arch="MistralForCausalLM", seed=0, **cfg):
    """A tiny random transformers model. Every weight is random, norms included, so that a
    weight read into the wrong place cannot go unnoticed."""
    family = "Llama" if arch.startswith("Llama") else "Mistral"
    config = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = getattr(transformers, family + "Config")(**{**config, **cfg})
    torch.manual_seed(seed)
    return randomize_(getattr(transformers, arch)(config).eval())


def our_model(seed=0, **overrides) -> Transformer:
    """A tiny random model of ours (fp32, eval mode)."""
    torch.manual_seed(seed)
    return Transformer(preset("tiny", vocab_size=101, **overrides)).init_weights(std=0.05).eval()


def hf_checkpoint(path, arch="MistralForCausalLM", **cfg):
    """Save a tiny transformers model as a checkpoint directory; returns (dir, hf model)."""
    m = hf_model(arch, **cfg)
    m.save_pretrained(path)
    return str(path), m


def edit_checkpoint(path, edit):
    """Apply edit(tensors) -> tensors to a single-file checkpoint in place."""
    file = os.path.join(path, "model.safetensors")
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})


def ids_for(vocab=101, B=2, T=12, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# logits match transformers


@pytest.mark.parametrize("cfg", [
    dict(num_key_value_heads=4, vocab_size=128),  # plain multi-head attention, even vocab
    dict(num_key_value_heads=2, rope_theta=1e6, vocab_size=101),  # GQA 2:1, Mistral v0.2 theta, odd vocab
    dict(num_key_value_heads=1, rope_theta=5e5, tie_word_embeddings=True),  # GQA 4:1, tied embeddings
], ids=["mha", "gqa-theta", "mqa-tied"])
def test_causal_logits_match_transformers_mistral(tmp_path, cfg):
    path, hf = hf_checkpoint(tmp_path / "ckpt", **cfg)
    ours = Transformer.from_pretrained(path).eval()
    assert ours.args.causal and ours.args.rope_theta == cfg.get("rope_theta", 10000.0)
    ids = ids_for(cfg.get("vocab_size", 101))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, **TOL)


def test_bidirectional_logits_match_transformers_given_all_visible_mask(tmp_path):
    path, hf = hf_checkpoint(tmp_path / "ckpt", rope_theta=1e6)
    ours = Transformer.from_pretrained(path).eval()
    ids = ids_for()
    B, T = ids.shape
    with torch.no_grad():
        out = ours(ids, causal=False)
        assert_close(out, hf(ids, attention_mask=torch.zeros(B, 1, T, T)).logits, **TOL)
        assert not torch.allclose(out, ours(ids, causal=True), atol=1e-3)  # the mask matters
        # bidirectional with padding: a float 4D mask hiding the padded keys from every query
        real = torch.ones(B, T, dtype=torch.bool)
        real[0, -4:] = False
        mask4d = torch.zeros(B, 1, T, T).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
        out = ours(ids, causal=False, key_padding_mask=real)
        assert_close(out[real], hf(ids, attention_mask=mask4d).logits[real], **TOL)


def test_logits_match_transformers_llama(tmp_path):
    path, hf = hf_checkpoint(tmp_path / "ckpt", "LlamaForCausalLM", rope_theta=5e5)
    ours = Transformer.from_pretrained(path).eval()
    assert ours.args.model_type == "llama" and ours.args.sliding_window is None
    ids = ids_for()
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, **TOL)


@pytest.mark.parametrize("side", ["right", "left"])
def test_key_padding_mask_matches_transformers_attention_mask(tmp_path, side):
    path, hf = hf_checkpoint(tmp_path / "ckpt")
    ours = Transformer.from_pretrained(path).eval()
    ids = ids_for(T=10)
    real = torch.ones_like(ids, dtype=torch.bool)
    real[0, 7:] = False  # row 0 has 3 pads; row 1 none
    if side == "left":
        real = real.flip(-1)
    with torch.no_grad():
        out = ours(ids, key_padding_mask=real)
        ref = hf(ids, attention_mask=real.long()).logits
    assert not out.isnan().any()  # padded queries see nothing real, yet nothing turns NaN
    assert_close(out[real], ref[real], **TOL)  # compare only where there is a token


def test_reward_head_matches_transformers_sequence_classification(tmp_path):
    pad = 0
    path, hf = hf_checkpoint(tmp_path / "rm", "MistralForSequenceClassification", num_labels=1,
                             pad_token_id=pad)
    ours = Transformer.from_pretrained(path).eval()
    assert ours.args.head == "score" and not hasattr(ours, "lm_head")
    ids = ids_for().clamp(min=1)  # no pad token: both read the last position
    with torch.no_grad():
        r = ours(ids)
        assert r.shape == (2,)
        assert_close(r, hf(ids).logits[:, 0], **TOL)
        # right-padded: transformers reads the last non-pad token, we are told where it is
        n = torch.tensor([12, 8])
        ids[1, 8:] = pad
        real = torch.arange(12) < n[:, None]
        r = ours(ids, key_padding_mask=real, last_index=n - 1)
        assert_close(r, hf(ids, attention_mask=real.long()).logits[:, 0], **TOL)


def test_embeds_path_equals_ids_path():
    m = our_model()
    ids = ids_for()
    with torch.no_grad():
        assert torch.equal(m(ids), m(embeds=m.embed_tokens(ids)))
        # soft inputs p @ E (what the diffusion model and reward guidance feed) of a one-hot p
        p = torch.nn.functional.one_hot(ids, 101).float()
        assert_close(m(embeds=p @ m.embed_tokens.weight), m(ids), **TOL)


def test_timestep_embedding_zero_time_adds_nothing_and_time_changes_outputs():
    m = our_model(timestep_embed=True, causal=False)
    assert m.args.causal is False
    ids = ids_for()
    with torch.no_grad():
        m.timestep_embed.weight.normal_()  # nonzero, as after training
        base = m(ids)
        assert torch.equal(m(ids, t=torch.zeros(2, 12)), base)
        out = m(ids, t=torch.full((2, 12), 0.5))
        assert not torch.allclose(out, base, atol=1e-3)
        # t per sequence (B,) means the same time at every position, even when B == T
        square = ids_for(B=4, T=4)
        t = torch.tensor([0.1, 0.2, 0.3, 0.4])
        assert torch.equal(m(square, t=t), m(square, t=t[:, None].expand(4, 4)))
    with pytest.raises(ValueError, match="timestep_embed=True"):
        our_model()(ids, t=torch.zeros(2, 12))


# -----------------------------------------------------------------------------
# attention: the SDPA calls


def test_masked_grouped_attention_repeats_kv_and_is_the_written_out_softmax(monkeypatch):
    """With a mask, SDPA gets K/V of every head (grouped K/V plus a mask would leave CUDA only its math
    kernel): query head h reads K/V head h // (nh / nkv), as transformers' repeat_kv lays them out.
    Without a mask the grouped K/V go as they are (enable_gqa: the flash kernel takes them)."""
    B, nh, nkv, T, hd = 2, 4, 2, 6, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, hd, generator=g) for n in (nh, nkv, nkv))
    real = torch.arange(T) < torch.tensor([[T], [4]])  # (B, T): row 1 has 2 pads
    mask = M.attention_mask(T, False, None, real, "cpu")  # (B, 1, T, T)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(M.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((k.size(1), kw["enable_gqa"])) or sdpa(q, k, v, **kw))
    out = M.attend(q, k, v, mask, False)
    assert calls == [(nh, False)]
    kv_head = [h // (nh // nkv) for h in range(nh)]
    scores = (q @ k[:, kv_head].transpose(-1, -2) / hd ** 0.5).masked_fill(~mask, float("-inf"))  # (B, nh, T, T)
    assert_close(out, torch.softmax(scores, -1) @ v[:, kv_head], atol=1e-6, rtol=1e-5)
    M.attend(q, k, v, None, True)
    assert calls[1:] == [(nkv, True)]


def test_logits_are_unchanged_by_repeating_kv(monkeypatch):
    m = our_model()  # 4 heads over 2 K/V heads
    ids = ids_for()
    real = torch.ones_like(ids, dtype=torch.bool)
    real[0, -3:] = False
    with torch.no_grad():
        repeated = [m(ids, key_padding_mask=real, causal=c) for c in (True, False)]
        monkeypatch.setattr(M, "attend", lambda q, k, v, mask, is_causal: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True))  # grouped K/V with the mask
        grouped = [m(ids, key_padding_mask=real, causal=c) for c in (True, False)]
    for a, b in zip(repeated, grouped):
        assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_sdpa_backends_reports_every_kind_of_call_on_cpu():
    from bench.bench_model import sdpa_backends
    report = sdpa_backends(T=32)
    kinds = ["bidirectional", "causal", "masked", "causal, masked", "causal, windowed"]
    assert list(report) == [f"{kind}, {heads}" for heads in ("MHA", "GQA 4:1") for kind in kinds]
    for kind, (picked, accepted) in report.items():
        assert "MATH" in accepted and picked == accepted[0], kind
        assert picked != "MATH", f"{kind}: SDPA falls back to the math kernel on this CPU"


# -----------------------------------------------------------------------------
# loading the released layouts


def test_tess2_checkpoint_loads_as_bidirectional_diffusion_model(tmp_path):
    """hamishivi/tess2: Mistral + [PAD] (odd vocab) + timestep_embed.weight (D, 1), no causal mask."""
    V, D = 32001, 32
    cfg = dict(architectures=["MistralForDiffusionLM"], model_type="mistral", vocab_size=V, hidden_size=D,
               intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
               torch_dtype="bfloat16", is_causal=False, disable_timestep_embed=False,  # the released flags
               self_condition="logits_mean", padding_side="right")
    args = ModelArgs.from_hf(cfg, timestep_embed=True, causal=False)
    torch.manual_seed(0)
    tensors = {k: v.to(torch.bfloat16) for k, v in Transformer(args).init_weights().state_dict().items()}
    tensors["timestep_embed.weight"] = torch.randn(D, 1).to(torch.bfloat16)
    os.makedirs(tmp_path / "tess2")
    write_json(tmp_path / "tess2" / "config.json", cfg)
    save_file(tensors, tmp_path / "tess2" / "model.safetensors", metadata={"format": "pt"})

    m = Transformer.from_pretrained(str(tmp_path / "tess2")).eval()
    assert m.args.timestep_embed and not m.args.causal and m.args.vocab_size == V
    assert m.timestep_embed.weight.shape == (D, 1) and m.timestep_embed.weight.dtype == torch.float32
    assert torch.equal(m.timestep_embed.weight, tensors["timestep_embed.weight"].float())
    ids = ids_for(V)
    with torch.no_grad():
        assert torch.equal(m(ids), m(ids, causal=False))  # bidirectional by default


@pytest.mark.parametrize("cfg, timestep_embed, causal", [
    (dict(architectures=["MistralForCausalLM"]), False, True),
    (dict(architectures=["MistralForDiffusionLM"]), True, False),
    (dict(architectures=["MistralForDiffusionLM"], is_causal=True, disable_timestep_embed=True), False, True),
    (dict(architectures=["LlamaForDiffusionLM"], timestep_embed=True, causal=True), True, True),  # ours win
])
def test_config_flags_of_the_released_code_and_ours_are_both_read(cfg, timestep_embed, causal):
    a = ModelArgs.from_hf(dict(vocab_size=32001, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **cfg))
    assert (a.timestep_embed, a.causal) == (timestep_embed, causal)


def test_a_classifier_with_several_labels_is_not_a_reward_model():
    cfg = dict(architectures=["MistralForSequenceClassification"], id2label={"0": "bad", "1": "good"})
    with pytest.raises(ValueError, match="2 labels"):
        ModelArgs.from_hf(cfg)
    assert ModelArgs.from_hf({**cfg, "id2label": {"0": "LABEL_0"}}).head == "score"


def test_adapting_an_ar_checkpoint_adds_a_zero_timestep_embedding_and_says_so(tmp_path, capsys):
    path, hf = hf_checkpoint(tmp_path / "ar")
    m = Transformer.from_pretrained(path, timestep_embed=True, causal=False).eval()
    assert "timestep_embed.weight" in capsys.readouterr().out
    assert not m.args.causal and torch.equal(m.timestep_embed.weight, torch.zeros(64, 1))
    params = dict(m.named_parameters())  # the new weight is trained like the others
    assert "timestep_embed.weight" in params and all(p.requires_grad for p in params.values())
    ids = ids_for()
    B, T = ids.shape
    with torch.no_grad():  # at first the adapted model is the AR model with its causal mask removed
        assert_close(m(ids, t=torch.rand(B, T)), hf(ids, attention_mask=torch.zeros(B, 1, T, T)).logits, **TOL)
    # what we save is the diffusion model and reads back as one
    m.save_pretrained(tmp_path / "tess")
    assert json.load(open(tmp_path / "tess" / "config.json"))["architectures"] == ["MistralForDiffusionLM"]
    again = Transformer.from_pretrained(str(tmp_path / "tess"), verbose=False)
    assert again.args.timestep_embed and not again.args.causal


def test_score_head_from_an_lm_checkpoint_drops_lm_head(tmp_path, capsys):
    path, hf = hf_checkpoint(tmp_path / "lm")
    rm = Transformer.from_pretrained(path, head="score").eval()
    out = capsys.readouterr().out
    assert "score.weight" in out and "lm_head.weight" in out
    assert not hasattr(rm, "lm_head") and rm.score.weight.shape == (1, 64)
    assert rm.score.weight.abs().sum() > 0  # initialised, not left empty
    with torch.no_grad():
        r = rm(ids_for())
        hidden = hf.model(ids_for()).last_hidden_state[:, -1]  # (B, D)
    assert_close(r, hidden @ rm.score.weight[0], **TOL)


def test_hub_repo_id_loads_from_the_offline_hub_cache(tmp_path, monkeypatch):
    """resolve("org/name") goes through huggingface_hub.snapshot_download; offline it must
    find the snapshot in a cache laid out as the Hub writes it."""
    import huggingface_hub.constants as hub
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--name"
    hf_checkpoint(repo / "snapshots" / commit)
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text(commit)
    # huggingface_hub reads these variables once, at import: patch both the env and its constants
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)

    assert resolve("org/name") == str(repo / "snapshots" / commit)
    m = Transformer.from_pretrained("org/name", verbose=False)
    assert m.args.vocab_size == 101
    with pytest.raises(FileNotFoundError, match="org/missing"):
        resolve("org/missing")
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        resolve(str(tmp_path / "nowhere"))


# -----------------------------------------------------------------------------
# saving, sharding, round trips with transformers


def test_sharded_save_loads_back_equal(tmp_path):
    m = our_model()
    m.save_pretrained(tmp_path / "ckpt", max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and len(shards) > 3
    again = Transformer.from_pretrained(str(tmp_path / "ckpt"))
    assert again.state_dict().keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("shard", [False, True])
def test_we_load_what_transformers_saves(tmp_path, shard):
    hf = hf_model(rope_theta=1e6)
    hf.save_pretrained(tmp_path / "ckpt", max_shard_size="50KB" if shard else "5GB")
    assert os.path.exists(tmp_path / "ckpt" / "model.safetensors.index.json") == shard
    ours = Transformer.from_pretrained(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        assert_close(ours(ids_for()), hf(ids_for()).logits, **TOL)


@pytest.mark.parametrize("cfg", [dict(rope_theta=1e6), dict(rope_theta=5e5, tie_word_embeddings=True),
                                 dict(model_type="llama")], ids=["theta", "tied", "llama"])
def test_transformers_loads_what_we_save(tmp_path, cfg):
    ours = our_model(**cfg)
    ours.save_pretrained(tmp_path / "ckpt", max_shard_bytes=100_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(hf).__name__ == ours.args.architecture
    assert hf.config.rope_parameters["rope_theta"] == ours.args.rope_theta
    with torch.no_grad():
        assert_close(hf(ids_for()).logits, ours(ids_for()), **TOL)


def test_tied_embeddings_stay_tied_through_save_and_load(tmp_path):
    m = our_model(tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "ckpt")
    assert "lm_head.weight" not in load_file(tmp_path / "ckpt" / "model.safetensors")
    again = Transformer.from_pretrained(str(tmp_path / "ckpt"))
    assert again.lm_head.weight is again.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, m.lm_head.weight)
    # a tied checkpoint that stores the head anyway (some do) loads too, the copy ignored
    edit_checkpoint(tmp_path / "ckpt", lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    again = Transformer.from_pretrained(str(tmp_path / "ckpt"), verbose=False)
    assert again.lm_head.weight is again.embed_tokens.weight


def test_save_overwrites_atomically_and_a_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    our_model(seed=0).save_pretrained(out, extra_files={"train_state.json": {"step": 1}})
    our_model(seed=1).save_pretrained(out, extra_files={"train_state.json": {"step": 2}})
    assert json.load(open(out / "train_state.json")) == {"step": 2}
    assert os.stat(out).st_mode & 0o777 == 0o755  # readable by all, like any checkpoint directory
    assert {f: os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)} == dict.fromkeys(os.listdir(out), 0o644)
    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["model.norm.weight"], our_model(seed=1).state_dict()["model.norm.weight"])

    def disk_full(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        our_model(seed=2).save_pretrained(out, extra_files={"train_state.json": {"step": 3}})
    assert json.load(open(out / "train_state.json")) == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directories left behind
    monkeypatch.undo()
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"], saved["model.norm.weight"])


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import model
    path, dtype = sys.argv[1:]
    if dtype == "save":  # a ~350 MB checkpoint; uninitialised weights are fine for measuring memory
        args = model.ModelArgs(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=4, sliding_window=None)
        model.Transformer(args).save_pretrained(path)
        sys.exit()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, after importing torch
    m = model.Transformer.from_pretrained(path, dtype=getattr(torch, dtype), verbose=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(peak * 1024, m.num_params(), *sorted({str(p.dtype) for p in m.parameters()}))
""")


@pytest.mark.slow
def test_loading_peaks_near_one_copy_of_the_weights(tmp_path):
    """A 7B checkpoint must not need twice its size in memory: measure a ~350 MB one, written by
    another process as a real checkpoint would be (the page cache of a file that its writer
    still holds hides mmap'd pages from RSS)."""
    def run(dtype):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big"), dtype], check=True,
                             capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(M.__file__)))
        peak, n, *dtypes = out.stdout.split() or [0, 0]
        return int(peak), int(n), dtypes

    run("save")
    size = os.path.getsize(tmp_path / "big" / "model.safetensors")
    assert size > 300e6
    fp32, n, dtypes = run("float32")
    assert dtypes == ["torch.float32"] and n * 4 <= size
    assert fp32 < 1.5 * size, f"loading a {size / 1e6:.0f} MB checkpoint peaked at {fp32 / 1e6:.0f} MB"
    bf16, n, dtypes = run("bfloat16")
    assert dtypes == ["torch.bfloat16"]
    assert bf16 < 0.9 * size, f"loading into bf16 peaked at {bf16 / 1e6:.0f} MB: the fp32 weights were held"


# -----------------------------------------------------------------------------
# bad checkpoints say what is wrong


def _truncate(path):
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


def _shard_then_delete_one(path):
    our_model().save_pretrained(path, max_shard_bytes=50_000)
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert shards[1] == f"model-00002-of-{len(shards):05d}.safetensors"
    os.remove(os.path.join(path, shards[1]))


def _edit_config(path, **cfg):
    c = json.load(open(os.path.join(path, "config.json")))
    write_json(os.path.join(path, "config.json"), {**c, **cfg})


BAD = {
    "missing tensor": (lambda p: edit_checkpoint(p, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up" not in k}),
                       ValueError, r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    "wrong shape": (lambda p: edit_checkpoint(p, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": torch.zeros(5, 64)}),
                    ValueError, r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*\(5, 64\), expected \(32, 64\)"),
    "unexpected tensor": (lambda p: edit_checkpoint(p, lambda t: {**t, "model.extra.weight": torch.zeros(3)}),
                          ValueError, r"unexpected tensor 'model\.extra\.weight'"),
    "unknown architecture": (lambda p: _edit_config(p, architectures=["GPT2LMHeadModel"]), ValueError,
                             r"unknown architecture 'GPT2LMHeadModel'"),
    "pickle only": (lambda p: os.rename(os.path.join(p, "model.safetensors"), os.path.join(p, "pytorch_model.bin")),
                    ValueError, r"pickle"),
    "truncated file": (_truncate, ValueError, r"model\.safetensors is not a readable safetensors file"),
    "no config.json": (lambda p: os.remove(os.path.join(p, "config.json")), FileNotFoundError, r"no config\.json"),
    "missing shard": (_shard_then_delete_one, FileNotFoundError, r"names shards that are not there: \['model-00002-of-"),
}


@pytest.mark.parametrize("problem", BAD)
def test_bad_checkpoints_fail_with_a_message_naming_the_problem(tmp_path, problem):
    break_it, error, message = BAD[problem]
    path = str(tmp_path / "ckpt")
    our_model().save_pretrained(path)
    break_it(path)
    with pytest.raises(error, match=message):
        Transformer.from_pretrained(path, verbose=False)


# -----------------------------------------------------------------------------
# compiled, checkpointed


@pytest.mark.slow
def test_compiled_forward_equals_eager_without_graph_breaks():
    m = our_model(timestep_embed=True)
    ids = ids_for()
    t = torch.rand(2, 12)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)  # fullgraph: a graph break is an error
    with torch.no_grad():
        assert_close(compiled(ids, t=t, causal=True), m(ids, t=t, causal=True), **TOL)
        assert_close(compiled(ids, t=t, causal=False), m(ids, t=t, causal=False), **TOL)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        m = our_model().train()
        m.gradient_checkpointing = checkpointing
        ids = ids_for()
        torch.nn.functional.cross_entropy(m(ids, causal=False).flatten(0, 1), ids.flatten()).backward()
        return {k: p.grad for k, p in m.named_parameters()}
    plain, ckpt = grads(False), grads(True)
    for k in plain:
        assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# tokenizer


def make_tokenizer_dir(path, dict_form=False, words=("hello", "world", "the", "cat")):
    """A word-level tokenizer.json with Mistral's special tokens and TESS 2's [PAD]."""
    special = lambda s: dict(content=s, lstrip=False, rstrip=False, normalized=False, single_word=False) if dict_form else s
    return word_tokenizer(path, ["<unk>", "<s>", "</s>", *words, "[PAD]"], decoder=True,
                          config=dict(bos_token=special("<s>"), eos_token=special("</s>"), pad_token=special("[PAD]")))


@pytest.mark.parametrize("dict_form", [False, True], ids=["str", "dict"])
def test_tokenizer_reads_special_ids_encodes_and_decodes(tmp_path, dict_form):
    tok = Tokenizer(make_tokenizer_dir(tmp_path / "tok", dict_form))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 7, 8)
    ids = tok.encode("hello the cat")
    assert ids == [3, 5, 6]  # no BOS/EOS added
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == "hello the cat"
    assert tok.encode_batch(["hello", "the cat"]) == [[3], [5, 6]]
    assert tok.fingerprint() == dict(vocab_size=8, bos_id=1, eos_id=2, pad_id=7, vocab_sha256=tok.vocab_sha256)
    assert tok.meta() == dict(tok.fingerprint(), tokenizer=str(tmp_path / "tok"), tokenizer_sha256=tok.sha256)
    assert Tokenizer(tmp_path / "tok" / "tokenizer.json").fingerprint() == tok.fingerprint()  # the file alone


def test_tokenizers_of_one_size_with_other_tokens_have_other_fingerprints(tmp_path):
    a = Tokenizer(make_tokenizer_dir(tmp_path / "a"))
    b = Tokenizer(make_tokenizer_dir(tmp_path / "b", words=["hello", "world", "a", "dog"]))
    assert (a.vocab_size, a.bos_id, a.eos_id, a.pad_id) == (b.vocab_size, b.bos_id, b.eos_id, b.pad_id)
    assert a.fingerprint() != b.fingerprint()


def test_tokenizer_adds_pad_like_tess_and_fetches_only_tokenizer_files_from_the_hub(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "org--model"
    word_tokenizer(repo, ["<unk>", "<s>", "</s>", "hi"],
                   config={"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": None})
    fetched = []

    def hf_hub_download(repo_id, filename, **kw):
        fetched.append(filename)
        return str(tmp_path / "hub" / repo_id.replace("/", "--") / filename)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    info = Tokenizer("org/model")
    assert fetched == ["tokenizer.json", "tokenizer_config.json"]  # not the weights
    assert (info.bos_id, info.eos_id, info.pad_id, info.vocab_size) == (1, 2, 4, 5)  # [PAD] = the next id
    assert info.meta()["tokenizer"] == "org/model" and info.vocab_sha256 == Tokenizer(repo).vocab_sha256


def test_tokenizer_files_travel_with_a_saved_checkpoint_and_a_missing_one_is_named(tmp_path):
    src = make_tokenizer_dir(tmp_path / "tok")
    our_model().save_pretrained(tmp_path / "ckpt", tokenizer_from=src)
    assert Tokenizer(str(tmp_path / "ckpt")).pad_id == 7
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        Tokenizer(str(tmp_path / "nowhere"))
