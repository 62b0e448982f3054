"""
The adaptation metrics of paper Tables 1-2 (METHOD.md §11): continuations of a prompt file scored
by perplexity under a held-out causal LM, distinct-1..4, unigram entropy and MAUVE.

    python -m eval.intrinsic --model M --prompts c4_val.jsonl --scorer SCORER_DIR --output out/intrinsic

--prompts: JSONL of {"prompt": ..., "reference": ...} (reference: the human continuation, which
MAUVE compares against; without it MAUVE is left out) or plain text, one prompt a line. The paper
uses 512 C4 validation prompts. --scorer: any causal Mistral/Llama checkpoint model.py reads,
with its own tokenizer (texts are re-tokenised for it). The paper's GPT-NeoX 1.3B is another
architecture, which model.py does not read; use a different family from the model under test
(e.g. Llama 3.2 1B, or SmolLM2-135M offline), and compare numbers only under one scorer.

MAUVE (the `mauve-text` package, GPL-3, installed by requirements-eval.txt, never vendored) compares
the scorer's features of the generations and of the references: the final hidden state (after the
last norm) at a text's last token, as MAUVE's own featurizer takes GPT-2's last-token state. A causal
LM's last position has read the whole text, so it summarises it; a mean over positions would weigh
the first tokens, which have seen little, as much. MAUVE quantises the features into about n/10
clusters: it needs a few dozen texts at least (the paper: 512); with a dozen, even identical sets
score 0.75.
"""
import argparse
import json
import os

import torch

import sample
from eval.harness import DEFAULT_MODEL, DEFAULT_REWARD_MODEL, check_output, resolve_default
from eval.metrics import distinct_n, perplexity, unigram_entropy
from model import Transformer
from support.cli import atomic_write, run_cli
from support.prompts import given, settings_for
from support.tokenizer import Tokenizer


def read_prompts(path: str) -> list[dict]:
    """[{"prompt", "reference" or None}] from JSONL objects or plain lines."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                o = json.loads(line)
            except json.JSONDecodeError:
                o = line.rstrip("\n")
            if isinstance(o, str):
                o = {"prompt": o}
            if not isinstance(o, dict) or not isinstance(o.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected {{\"prompt\": ..., \"reference\": ...}} or a plain line")
            records.append(dict(prompt=o["prompt"], reference=o.get("reference")))
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


@torch.no_grad()
def features(scorer, tok, texts: list[str], max_len: int = 1024) -> torch.Tensor:
    """(N, D) MAUVE features: the scorer's final hidden state at each text's last token (BOS + text)."""
    dev = scorer.embed_tokens.weight.device
    out = []
    for text in texts:
        ids = torch.tensor([[tok.bos_id] + tok.encode(text)[:max_len - 1]], device=dev)  # (1, T)
        out.append(scorer.hidden_states(ids, causal=True)[0, -1].float().cpu())  # (D,)
    return torch.stack(out)


def mauve_score(p_features, q_features, seed: int = 25) -> float:
    import mauve
    return float(mauve.compute_mauve(p_features=p_features.numpy(), q_features=q_features.numpy(),
                                     device_id=-1, verbose=False, seed=seed).mauve)


def measure(records, texts, scorer=None, scorer_tok=None) -> dict:
    """Distinct-1..4 and entropy of the texts; with a scorer, the perplexity of each continuation
    given its prompt under the scorer and, where every record has a reference, MAUVE."""
    m = {f"distinct_{n}": distinct_n(texts, n) for n in range(1, 5)}
    m["entropy"] = unigram_entropy(texts)
    m["mean_words"] = sum(len(t.split()) for t in texts) / len(texts)
    if scorer is not None:
        prompts = [[scorer_tok.bos_id] + scorer_tok.encode(r["prompt"]) for r in records]
        m["perplexity"] = perplexity(scorer, prompts, [scorer_tok.encode(t) for t in texts])
        if all(r["reference"] for r in records):
            m["mauve"] = mauve_score(features(scorer, scorer_tok, [r["reference"] for r in records]),
                                     features(scorer, scorer_tok, texts))
    return m


def load(path, dtype, device, default=DEFAULT_MODEL):
    path = resolve_default(path, default)
    return Transformer.from_pretrained(path, dtype=dtype, device=device, verbose=False).eval(), Tokenizer(path)


def common_flags(p):
    """The flags eval.intrinsic and eval.sweep share. Sampling flags left out take the checkpoint's
    generation_config.json, as in sample.py."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusion checkpoint: folder or Hub id")
    p.add_argument("--prompts", required=True, help="JSONL {\"prompt\", \"reference\"} or one prompt a line")
    p.add_argument("--scorer", help="held-out causal LM for perplexity and MAUVE features (folder or Hub id)")
    p.add_argument("--output", required=True, help="folder for the results and every generation")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--length", type=int, help="positions generated after each prompt (default: rows of the "
                                              "checkpoint's total length)")
    p.add_argument("--top-p", type=float, help="nucleus projection (default: the checkpoint's)")
    p.add_argument("--argmax", action="store_true")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, help="Tulu template around prompts (default: "
                   "the checkpoint's: tuned models use it; the paper's adaptation metrics, on adapted models, do not)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, help="prompt j is sampled with seed + j (default: the checkpoint's)")
    p.add_argument("--reward-model", help="for --eta")
    p.add_argument("--guidance-steps", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])


def setup(a):
    """Validated flags -> (records, model, tok, scorer, scorer_tok, settings for sample.generate): the
    Settings fields the flags give except steps and eta (passed on their own: eval.sweep sweeps
    them), and the reward model. a.chat becomes the value used (the checkpoint's if not given)."""
    check_output(a.output)
    records = read_prompts(a.prompts)[:a.limit]
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    model, tok = load(a.model, dtype, dev)
    scorer, scorer_tok = load(a.scorer, dtype, dev) if a.scorer else (None, None)
    if scorer is not None and scorer.args.head != "lm":
        raise ValueError(f"--scorer {a.scorer} has no LM head: give a causal language model")
    wants_reward = a.reward_model or getattr(a, "eta", None)
    reward, reward_tok = load(a.reward_model or DEFAULT_REWARD_MODEL, dtype, dev,
                              DEFAULT_REWARD_MODEL) if wants_reward else (None, None)
    flags = {k: v for k, v in given(a).items() if k not in ("steps", "eta")}
    a.chat = settings_for(model.generation_config, model.args.max_length, **flags).chat
    return records, model, tok, scorer, scorer_tok, dict(flags, reward_model=reward, reward_tokenizer=reward_tok)


def write_generations(path, records, texts):
    atomic_write(path, "".join(json.dumps(dict(prompt=r["prompt"], reference=r["reference"], text=t),
                                          ensure_ascii=False) + "\n" for r, t in zip(records, texts)))


def main(argv=None):
    p = argparse.ArgumentParser(prog="eval.intrinsic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common_flags(p)
    p.add_argument("--steps", type=int, help="diffusion steps (default: the checkpoint's)")
    p.add_argument("--eta", type=float, help="reward guidance (needs --reward-model, or the shipped one)")
    a = p.parse_args(argv)
    records, model, tok, scorer, scorer_tok, settings = setup(a)
    texts = sample.generate(model, tok, [r["prompt"] for r in records], steps=a.steps, eta=a.eta, **settings)
    write_generations(os.path.join(a.output, "generations.jsonl"), records, texts)
    metrics = measure(records, texts, scorer, scorer_tok)
    used = settings_for(model.generation_config, model.args.max_length, steps=a.steps, eta=a.eta,
                        **{k: v for k, v in settings.items() if k not in ("reward_model", "reward_tokenizer")})
    atomic_write(os.path.join(a.output, "metrics.json"), dict(metrics, model=a.model, scorer=a.scorer,
                                                              steps=used.steps, eta=a.eta, n=len(records)))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    run_cli(main, "eval.intrinsic")
