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

OUTPUT/generations.jsonl and OUTPUT/metrics.json are written as one set, metrics.json carrying the
fingerprint of what produced them (the model's, scorer's and reward model's files, the prompts,
every setting, the dtype and device): the same run again prints them and samples nothing; any
other run replaces both. Refused before any weights load, with one line and nothing written: a
flag out of its range, an empty --prompts file, a --model that is not a diffusion model, a --scorer
that is not a causal LM, a reward model of another tokenizer, a prompt too long for the model.
`torchrun --nproc_per_node N -m eval.intrinsic ...` spreads the batches over N processes (prompt j
is sampled with seed + j whichever process has it); the first measures and writes.
"""
import argparse
import dataclasses
import json
import os
import types

import torch

import sample
from eval.harness import (DEFAULT_MODEL, DEFAULT_REWARD_MODEL, Checkpoint, Store, check_scorer, output_folder,
                          device_and_dtype, request_key, sample_answers, sampling_flags)
from eval.metrics import distinct_n, perplexity, unigram_entropy
from support.cli import (ArgumentParser, atomic_write, eta_flag, fingerprint, number, read_marker, replace_files,
                         run_cli, seed_flag)
from support.prompts import Generation, empty_answer, given, plan, processes, settings_for


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
        raise ValueError(f"--prompts {path}: no prompts in it (it is empty or blank): one prompt a line")
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


def common_flags(p):
    """The flags eval.intrinsic and eval.sweep share, each number in its range. Sampling flags left
    out (None) take the checkpoint's generation_config.json, as in sample.py."""
    positive = number(int, lo=1)
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusion checkpoint: folder or Hub id")
    p.add_argument("--prompts", required=True, help="JSONL {\"prompt\", \"reference\"} or one prompt a line")
    p.add_argument("--scorer", help="held-out causal LM for perplexity and MAUVE features (folder or Hub id)")
    p.add_argument("--output", required=True, help="folder for the results and every generation")
    p.add_argument("--limit", type=positive, help="only the first N prompts")
    p.add_argument("--length", type=positive, help="positions generated after each prompt (default: rows of the "
                                                   "checkpoint's total length)")
    p.add_argument("--top-p", type=number(float, lo=0, hi=1, lo_open=True),
                   help="nucleus projection (default: the checkpoint's)")
    p.add_argument("--argmax", action="store_true")
    sampling_flags(p)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, help="Tulu template around prompts (default: "
                   "the checkpoint's: tuned models use it; the paper's adaptation metrics, on adapted models, do not)")
    p.add_argument("--batch-size", type=positive)
    p.add_argument("--seed", type=seed_flag, help="prompt j is sampled with seed + j (default: the checkpoint's)")
    p.add_argument("--reward-model", help="for --eta")
    p.add_argument("--guidance-steps", type=positive)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])


def prepare(a, steps=None, eta=None, guided=False):
    """Everything checked before any weights load: the prompts, the checkpoints' configs and
    tokenizers (a diffusion model, a causal scorer, a reward model of the same tokenizer), the device,
    the settings and every batch (rows that fit the model). guided: a reward model is needed (the
    shipped one unless --reward-model). Returns the plan of the run: records, the Checkpoints,
    settings (sample.generate's Settings) and flags (what to pass to sample.generate)."""
    records = read_prompts(a.prompts)[:a.limit]
    model = Checkpoint.read(a.model, "--model", DEFAULT_MODEL)
    scorer = Checkpoint.read(a.scorer, "--scorer") if a.scorer else None
    if scorer is not None:
        check_scorer(scorer, a.scorer)
    wants_reward = a.reward_model or guided or eta
    reward = Checkpoint.read(a.reward_model or DEFAULT_REWARD_MODEL, "--reward-model",
                             DEFAULT_REWARD_MODEL) if wants_reward else None
    sample.check_pair(model.args, model.tokenizer, reward and reward.args, reward and reward.tokenizer)
    device, dtype = device_and_dtype(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else dtype
    flags = {k: v for k, v in given(a).items() if k not in ("steps", "eta")}
    settings = settings_for(model.generation_config, model.args.max_length, model.config_file, steps=steps, eta=eta,
                            **flags)
    plan(model.tokenizer, [r["prompt"] for r in records], settings, model.args)  # every row fits, or a message
    return types.SimpleNamespace(records=records, model=model, scorer=scorer, reward=reward, device=device,
                                 dtype=dtype, settings=settings, flags=flags)


def produced_by(prepared) -> dict:
    """What a run's results depend on besides the swept values: the checkpoints' files, the prompts,
    every setting, the dtype and the device (the key of its results)."""
    p = prepared
    return dict(model=p.model.identity(), scorer=p.scorer and p.scorer.identity(),
                reward=p.reward and p.reward.identity(), prompts=p.records, settings=dataclasses.asdict(p.settings),
                dtype=str(p.dtype), device=p.device.type)


def load(prepared, scorer=True):
    """The weights: (model, reward model or None, scorer or None); the scorer only where it measures
    (the first process of a torchrun)."""
    p = prepared
    model = p.model.load(p.dtype, p.device)
    reward = p.reward.load(p.dtype, p.device) if p.reward else None
    return model, reward, p.scorer.load(p.dtype, p.device) if scorer and p.scorer else None


def answers(prepared, model, reward, **generate_kwargs) -> list[dict]:
    """Every prompt's answer {"text", "tokens"}: batches spread over the processes of a torchrun."""
    p = prepared
    prompts = [r["prompt"] for r in p.records]
    key = lambda j: request_key(j, prompts[j])  # noqa: E731  (an in-memory store: one run's answers)
    return sample_answers(model, p.model.tokenizer, prompts, p.settings, Store(None), key, "intrinsic", **p.flags,
                          reward_model=reward, reward_tokenizer=p.reward and p.reward.tokenizer, **generate_kwargs)


def generations_file(records, texts) -> str:
    """generations.jsonl: {"prompt", "reference", "text"} a line."""
    return "".join(json.dumps(dict(prompt=r["prompt"], reference=r["reference"], text=t), ensure_ascii=False) + "\n"
                   for r, t in zip(records, texts))


def main(argv=None):
    p = ArgumentParser(prog="eval.intrinsic", description=__doc__.split("\n\n")[0])
    common_flags(p)
    p.add_argument("--steps", type=number(int, lo=1), help="diffusion steps (default: the checkpoint's)")
    p.add_argument("--eta", type=eta_flag, help="reward guidance (needs --reward-model, or the shipped one)")
    a = p.parse_args(argv)
    prepared = prepare(a, steps=a.steps, eta=a.eta)
    key = fingerprint(produced_by(prepared))
    earlier = read_marker(a.output, "metrics.json") if os.path.isdir(a.output) else None
    if earlier is not None and earlier.get("fingerprint") == key:  # every process sees the same file
        if processes()[0] == 0:
            print(f"{a.output} holds this run's metrics: nothing to do")
            print(json.dumps({k: v for k, v in earlier.items() if k != "fingerprint"}, indent=2))
        return
    rank, records = processes()[0], prepared.records
    with output_folder(a.output) as out:
        model, reward, scorer = load(prepared, scorer=rank == 0)
        made = answers(prepared, model, reward, steps=a.steps, eta=a.eta)
        if rank > 0:
            return
        if not any(x["text"].strip() for x in made):  # an empty result is no measurement
            raise ValueError(f"all {len(made)} answers are empty, nothing to measure; the first: "
                             f"{empty_answer(Generation(records[0]['prompt'], made[0]['text'], made[0]['tokens']))}")
        texts = [x["text"] for x in made]
        metrics = measure(records, texts, scorer, prepared.scorer and prepared.scorer.tokenizer)
        staging = out.staging("results")
        atomic_write(os.path.join(staging, "generations.jsonl"), generations_file(records, texts))
        atomic_write(os.path.join(staging, "metrics.json"), dict(
            metrics, model=a.model, scorer=a.scorer, steps=prepared.settings.steps, eta=a.eta, n=len(records),
            fingerprint=key))
        replace_files(staging, a.output, "metrics.json", old=["generations.jsonl"])
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    run_cli(main, "eval.intrinsic")
