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
OUTPUT/model_outputs.json is a JSON list of {"instruction", "output", "generator", "dataset"}; with
a judge, OUTPUT/leaderboard.json and the judge's files in OUTPUT/judge/. They are replaced as one set.
Generations are appended to OUTPUT/generations.jsonl as they are made, keyed by what produced them
(the model's and reward model's files, the batch's instructions, every setting, the dtype and
device), so a stopped run resumes and another model or other settings sample anew.

Refused before any weights load, with one line and nothing written: a flag out of its range,
--length with --total-length, instructions that are not JSON or hold none, a --model that is not a
diffusion model, a reward model of another tokenizer, an instruction too long for the model, a judge
that calls OpenAI without OPENAI_API_KEY. `torchrun --nproc_per_node N -m eval.alpaca ...` spreads
the batches over N processes (instruction j is sampled with seed + j whichever process has it); the
first writes.
"""
import dataclasses
import json
import os
import sys

import torch

import sample
from eval.harness import (DEFAULT_MODEL, DEFAULT_REWARD_MODEL, Checkpoint, Store, output_folder, device_and_dtype,
                          request_key, sample_answers, sampling_flags)
from support.cli import ArgumentParser, atomic_write, eta_flag, number, replace_files, run_cli, seed_flag
from support.prompts import given, plan, processes, settings_for

HUB_DATASET = "tatsu-lab/alpaca_eval"  # its alpaca_eval.json holds the 805 instructions
RESULT = ["model_outputs.json", "leaderboard.json", "judge"]  # what a run puts in OUTPUT, replaced as one set


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
        items = []
        for n, line in enumerate(text.split("\n"), 1):
            try:
                items += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e.msg}); --prompts is a JSON list or JSONL of "
                                 "{\"instruction\": ...}") from None
    if not isinstance(items, list) or not all(isinstance(r, dict) and isinstance(r.get("instruction"), str)
                                              for r in items):
        raise ValueError(f"{path}: expected a JSON list (or JSONL) of objects with an \"instruction\" string")
    if not items:
        raise ValueError(f"--prompts {path} holds no instructions")
    return [dict(instruction=r["instruction"], dataset=r.get("dataset", "local")) for r in items]


def generate_outputs(model, tok, items, out_dir, generator, produced_by, reward_model=None, reward_tokenizer=None,
                     **settings) -> list[dict]:
    """One response per instruction, in the chat template, batch by batch (eval.harness.sample_answers:
    instruction j sampled with seed + j, batches spread over the processes of a torchrun): `settings`
    (Settings fields) over the checkpoint's, as sample.generate takes them. Each is appended to
    out_dir/generations.jsonl, keyed by produced_by (what made it), its batch's instructions and every
    setting: a run resumes where it stopped."""
    settings = dict(settings, chat=True)
    s = settings_for(getattr(model, "generation_config", None), model.args.max_length, **settings)
    store = Store(os.path.join(out_dir, "generations.jsonl"), write=processes()[0] == 0)
    instructions = [item["instruction"] for item in items]
    batch = lambda j: instructions[j - j % s.batch_size:][:s.batch_size]  # noqa: E731  (prompt j's batch)
    same = dict(produced_by, settings=dataclasses.asdict(s))
    key = lambda j: request_key("alpaca", same, j, batch(j))  # noqa: E731
    made = sample_answers(model, tok, instructions, s, store, key, "alpaca_eval", reward_model=reward_model,
                          reward_tokenizer=reward_tokenizer, **settings)
    return [dict(instruction=item["instruction"], output=answer["text"].strip(), generator=generator,
                 dataset=item["dataset"]) for item, answer in zip(items, made)]


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
    positive = number(int, lo=1)
    p = ArgumentParser(prog="eval.alpaca", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--output", required=True, help="folder: model_outputs.json, generations.jsonl, the judge's files")
    p.add_argument("--prompts", help="local JSON/JSONL of {\"instruction\"} (default: the Hub's 805)")
    p.add_argument("--limit", type=positive, help="only the first N instructions")
    p.add_argument("--generator", help="the name in the outputs and leaderboard (default: the model's folder name)")
    p.add_argument("--reward-model")
    p.add_argument("--eta", type=eta_flag)
    p.add_argument("--guidance-steps", type=positive)
    # sampling flags left out take the checkpoint's generation_config.json, as in sample.py
    p.add_argument("--steps", type=positive, help="diffusion steps (default: the checkpoint's)")
    p.add_argument("--length", type=positive, help="positions generated after each prompt (default: rows of the "
                                                   "checkpoint's total length; the paper's: 2048)")
    p.add_argument("--total-length", type=positive, help="every row this long (prompt + response)")
    p.add_argument("--top-p", type=number(float, lo=0, hi=1, lo_open=True),
                   help="nucleus projection (default: the checkpoint's)")
    p.add_argument("--argmax", action="store_true")
    sampling_flags(p)
    p.add_argument("--batch-size", type=positive, help="default: the checkpoint's")
    p.add_argument("--seed", type=seed_flag, help="instruction j is sampled with seed + j (default: the checkpoint's)")
    p.add_argument("--annotators-config", help="alpaca_eval judge: a config name (e.g. alpaca_eval_gpt4) or YAML path")
    p.add_argument("--reference-outputs", help="the judge's reference outputs (default: alpaca_eval's)")
    p.add_argument("--alpaca-eval-version", type=int, choices=[1, 2], default=1,
                   help="1: the paper's AlpacaEval 1 (text-davinci-003 reference); 2: GPT-4 Turbo reference")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    if a.length is not None and a.total_length is not None:
        p.error("--length and --total-length both set the length of a row: give one (--length N: N positions "
                "after each instruction; --total-length L: rows of L positions)")
    return a


def prepare(a):
    """Everything checked before any weights load: the judge, the instructions, the checkpoints'
    configs and tokenizers, the device and every row. Returns (items, model, reward, device, dtype)."""
    if a.annotators_config and not os.path.exists(a.annotators_config) and not os.environ.get("OPENAI_API_KEY"):
        raise ValueError(f"the judge {a.annotators_config} calls OpenAI: set OPENAI_API_KEY, or give a local "
                         "annotator config file")
    if a.reference_outputs and not os.path.isfile(a.reference_outputs):
        raise ValueError(f"--reference-outputs {a.reference_outputs}: no such file")
    model = Checkpoint.read(a.model, "--model", DEFAULT_MODEL)
    reward = Checkpoint.read(a.reward_model or DEFAULT_REWARD_MODEL, "--reward-model", DEFAULT_REWARD_MODEL) \
        if a.reward_model or a.eta else None
    sample.check_pair(model.args, model.tokenizer, reward and reward.args, reward and reward.tokenizer)
    device, dtype = device_and_dtype(a.device)
    items = read_prompts(a.prompts)[:a.limit]  # the Hub's, without --prompts: fetched once the rest is checked
    s = settings_for(model.generation_config, model.args.max_length, model.config_file, **dict(given(a), chat=True))
    plan(model.tokenizer, [item["instruction"] for item in items], s, model.args)  # every row fits, or a message
    return items, model, reward, device, getattr(torch, a.dtype) if a.dtype else dtype


def main(argv=None):
    a = parse_args(argv)
    items, model, reward, device, dtype = prepare(a)
    generator = a.generator or os.path.basename(os.path.normpath(a.model))
    produced_by = dict(model=model.identity(), reward=reward and reward.identity(), dtype=str(dtype),
                       device=device.type)
    with output_folder(a.output) as out:
        net, rm = model.load(dtype, device), reward.load(dtype, device) if reward else None
        outputs = generate_outputs(net, model.tokenizer, items, a.output, generator, produced_by, rm,
                                   reward and reward.tokenizer, **given(a))
        if processes()[0] > 0:
            return
        staging = out.staging("results")
        atomic_write(os.path.join(staging, "model_outputs.json"), outputs)
        result = None
        if a.annotators_config:
            result = judge(os.path.join(staging, "model_outputs.json"), os.path.join(staging, "judge"),
                           a.annotators_config, a.reference_outputs, a.alpaca_eval_version)
            atomic_write(os.path.join(staging, "leaderboard.json"), result)
        replace_files(staging, a.output, "leaderboard.json" if result else "model_outputs.json", old=RESULT)
    print(f"{len(outputs)} outputs: {os.path.join(a.output, 'model_outputs.json')}")
    for name, entry in (result or {}).items():
        print(f"{name}: win rate {entry['win_rate']:.2f} (n = {entry.get('n_total')})", file=sys.stdout)


if __name__ == "__main__":
    run_cli(main, "eval.alpaca")
