"""
AlpacaEval (paper Table 3: TESS 2 v0.1 63.1, GPT-4 judge, responses of up to 2048 tokens):
generate a response to each of the 805 instructions and write the model-outputs file that the
`alpaca-eval` package reads; run its judge when one is given.

    python -m eval.alpaca --model hamishivi/tess2 --output out/alpaca   # rows of 2048 (released default)
    python -m eval.alpaca --model M --output out/alpaca --annotators-config alpaca_eval_gpt4   # OPENAI_API_KEY
    python -m eval.alpaca --model M --prompts local.json --annotators-config my_judge.yaml \\
                          --reference-outputs ref.json --output out/alpaca           # a local judge

The instructions come from --prompts (a JSON list or JSONL of {"instruction": ...}, e.g. a copy of
alpaca_eval.json) or, on a connected machine, from the Hub data set tatsu-lab/alpaca_eval.
OUTPUT/model_outputs.json is a JSON list of {"instruction", "output", "generator", "dataset"};
generations are appended to OUTPUT/generations.jsonl as they are made, so a stopped run resumes.
"""
import argparse
import dataclasses
import json
import os
import sys

import sample
from eval.harness import (DEFAULT_MODEL, DEFAULT_REWARD_MODEL, Progress, Store, check_output, request_key,
                          resolve_default)
from model import Transformer
from support.cli import atomic_write, run_cli
from support.prompts import given, settings_for
from support.tokenizer import Tokenizer

HUB_DATASET = "tatsu-lab/alpaca_eval"  # its alpaca_eval.json holds the 805 instructions


def read_prompts(path: str | None) -> list[dict]:
    """[{"instruction", "dataset"}] from a JSON list / JSONL file, or the Hub's alpaca_eval.json."""
    if path is None:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(HUB_DATASET, "alpaca_eval.json", repo_type="dataset")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(items, list) or not all(isinstance(r, dict) and "instruction" in r for r in items):
        raise ValueError(f"{path}: expected a JSON list (or JSONL) of objects with an \"instruction\"")
    return [dict(instruction=r["instruction"], dataset=r.get("dataset", "local")) for r in items]


def generate_outputs(model, tok, items, out_dir, generator, reward_model=None, reward_tokenizer=None,
                     **settings) -> list[dict]:
    """One response per instruction, in the chat template, batch by batch: `settings` (Settings
    fields) over the checkpoint's, as sample.generate takes them; the batch that starts at item j is
    sampled with seed + j (prompt j gets seed + j, as in sample.generate), and appended to
    out_dir/generations.jsonl."""
    settings = dict(settings, chat=True)
    s = settings_for(getattr(model, "generation_config", None), model.args.max_length, **settings)
    store = Store(os.path.join(out_dir, "generations.jsonl"))
    progress = Progress("alpaca_eval", len(items))
    same = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("seed", "batch_size", "compile")}
    same["reward"] = reward_model is not None  # what an output depends on besides its seed: the resume key
    keys = [request_key("alpaca", same, s.seed, j - j % s.batch_size, item["instruction"])
            for j, item in enumerate(items)]
    for j in range(0, len(items), s.batch_size):
        batch = items[j:j + s.batch_size]
        if not all(k in store.records for k in keys[j:j + s.batch_size]):
            texts = sample.generate(model, tok, [item["instruction"] for item in batch], reward_model=reward_model,
                                    reward_tokenizer=reward_tokenizer, **dict(settings, seed=s.seed + j,
                                                                              batch_size=len(batch)))
            store.add([dict(key=k, output=t) for k, t in zip(keys[j:j + s.batch_size], texts)])
        progress.update(len(batch))
    return [dict(instruction=item["instruction"], output=store.records[k]["output"].strip(), generator=generator,
                 dataset=item["dataset"]) for item, k in zip(items, keys)]


def judge(outputs_path, out_dir, annotators_config, reference_outputs=None, version: int = 1):
    """alpaca_eval's evaluate: the leaderboard row as a dict, annotations in out_dir. The metric is
    the win rate; version 1 (the paper's AlpacaEval 1) also makes alpaca_eval's default reference
    the text-davinci-003 outputs. Its length-controlled AlpacaEval 2 metric is not computed (it
    downloads regression data)."""
    os.environ["IS_ALPACA_EVAL_2"] = str(version == 2)  # read when alpaca_eval is first imported
    from alpaca_eval import evaluate
    kwargs = dict(reference_outputs=reference_outputs) if reference_outputs else {}
    leaderboard, _ = evaluate(model_outputs=outputs_path, annotators_config=annotators_config,
                              output_path=out_dir, is_return_instead_of_print=True, fn_metric="get_winrate",
                              sort_by="win_rate", precomputed_leaderboard=None, **kwargs)
    return json.loads(leaderboard.to_json(orient="index"))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="eval.alpaca", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--output", required=True, help="folder: model_outputs.json, generations.jsonl, the judge's files")
    p.add_argument("--prompts", help="local JSON/JSONL of {\"instruction\"} (default: the Hub's 805)")
    p.add_argument("--limit", type=int, help="only the first N instructions")
    p.add_argument("--generator", help="the name in the outputs and leaderboard (default: the model's folder name)")
    p.add_argument("--reward-model")
    p.add_argument("--eta", type=float)
    p.add_argument("--guidance-steps", type=int)
    # sampling flags left out take the checkpoint's generation_config.json, as in sample.py
    p.add_argument("--steps", type=int, help="diffusion steps (default: the checkpoint's)")
    p.add_argument("--length", type=int, help="positions generated after each prompt (default: rows of the "
                                              "checkpoint's total length; the paper's: 2048)")
    p.add_argument("--total-length", type=int, help="every row this long (prompt + response)")
    p.add_argument("--top-p", type=float, help="nucleus projection (default: the checkpoint's)")
    p.add_argument("--argmax", action="store_true")
    p.add_argument("--batch-size", type=int, help="default: the checkpoint's")
    p.add_argument("--seed", type=int, help="instruction j is sampled with seed + j (default: the checkpoint's)")
    p.add_argument("--annotators-config", help="alpaca_eval judge: a config name (e.g. alpaca_eval_gpt4) or YAML path")
    p.add_argument("--reference-outputs", help="the judge's reference outputs (default: alpaca_eval's)")
    p.add_argument("--alpaca-eval-version", type=int, choices=[1, 2], default=1,
                   help="1: the paper's AlpacaEval 1 (text-davinci-003 reference); 2: GPT-4 Turbo reference")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    return p.parse_args(argv)


def main(argv=None):
    import torch
    a = parse_args(argv)
    check_output(a.output)
    if a.annotators_config and not os.path.exists(a.annotators_config) and not os.environ.get("OPENAI_API_KEY"):
        raise ValueError(f"the judge {a.annotators_config} calls OpenAI: set OPENAI_API_KEY, or give a local "
                         "annotator config file")
    items = read_prompts(a.prompts)[:a.limit]
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    path = resolve_default(a.model, DEFAULT_MODEL)
    model, tok = Transformer.from_pretrained(path, dtype=dtype, device=dev, verbose=False).eval(), Tokenizer(path)
    reward = reward_tok = None
    if a.reward_model or a.eta:
        rpath = resolve_default(a.reward_model or DEFAULT_REWARD_MODEL, DEFAULT_REWARD_MODEL)
        reward = Transformer.from_pretrained(rpath, dtype=dtype, device=dev, verbose=False).eval()
        reward_tok = Tokenizer(rpath)
    generator = a.generator or os.path.basename(os.path.normpath(a.model))
    outputs = generate_outputs(model, tok, items, a.output, generator, reward, reward_tok, **given(a))
    outputs_path = os.path.join(a.output, "model_outputs.json")
    atomic_write(outputs_path, outputs)
    print(f"{len(outputs)} outputs: {outputs_path}")
    if a.annotators_config:
        result = judge(outputs_path, a.output, a.annotators_config, a.reference_outputs, a.alpaca_eval_version)
        atomic_write(os.path.join(a.output, "leaderboard.json"), result)
        for name, entry in result.items():
            print(f"{name}: win rate {entry['win_rate']:.2f} (n = {entry.get('n_total')})", file=sys.stdout)


if __name__ == "__main__":
    run_cli(main, "eval.alpaca")
