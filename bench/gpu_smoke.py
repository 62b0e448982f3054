"""
(b) The product's own CUDA paths on the shipped miniature (models/tess2-shakespeare and its reward
model), each run as a user runs it, in its own process under its own time limit, several at a time:
  - python3 sample.py --device cuda, plain, --eta (reward guidance), --compile, --compile --eta
    (each compiled run's text against the eager run's with the same seed);
  - python3 train.py --stage adapt: two steps, plain and under torchrun --nproc_per_node 1 ... --fsdp
    (python3 -m torch.distributed.run when there is no torchrun);
  - python3 -m eval.harness on a two-question local task (skipped where lm-eval is not installed).
Runs in --work (run folders, checkpoints, the evaluation's output); each run's output is in
OUT/b-logs/NAME.log. In --cpu-smoke the same commands run on the CPU, and --compile runs with
TORCHDYNAMO_DISABLE=1 (compiling on a shared 2-core CPU takes minutes), which checks the flag's
path but not the compiler.
"""
import concurrent.futures
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import gpu_common

ROOT = gpu_common.ROOT
SHIPPED = os.path.join(ROOT, "models", "tess2-shakespeare")
PROMPTS = ["Continue this speech by Brutus from Julius Caesar:\nRomans, countrymen, and lovers!",
           "Who says this in Hamlet?\nTo be, or not to be, that is the question"]
QUESTIONS = [{"question": "Who says this in Hamlet? To be, or not to be", "question_id": "a",
              "answer": {"aliases": ["Hamlet"], "value": "Hamlet"}},
             {"question": "Who says this in Julius Caesar? Friends, Romans, countrymen", "question_id": "b",
              "answer": {"aliases": ["Antony"], "value": "Antony"}}]


def sample_runs(device, smoke):
    """name -> (command, extra environment) for the four sample.py runs."""
    base = [sys.executable, os.path.join(ROOT, "sample.py"), "--device", device, "--steps", "10", "--length", "32",
            "--seed", "0", "--json"] + [x for p in PROMPTS for x in ("--prompt", p)]
    no_dynamo = {"TORCHDYNAMO_DISABLE": "1"} if smoke else {}
    return {"sample --compile": (base + ["--compile"], no_dynamo),
            "sample --compile --eta": (base + ["--compile", "--eta", "0.25"], no_dynamo),
            "sample": (base, {}), "sample --eta": (base + ["--eta", "0.25"], {})}


def train_runs(device, data, work):
    """name -> (command, environment) for train.py plain and under a one-process launcher with --fsdp."""
    flags = ["--stage", "adapt", "--init", SHIPPED, "--data", data, "--max-steps", "2", "--batch-size", "2",
             "--seq-len", "128", "--save-every", "1000", "--device", device, "--seed", "0"]
    train = os.path.join(ROOT, "train.py")
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m",
                                                                            "torch.distributed.run"]
    return {"train": ([sys.executable, train, *flags, "--out", os.path.join(work, "run-plain")], {}),
            "train --fsdp": ([*launcher, "--standalone", "--nproc_per_node", "1", train, *flags, "--fsdp",
                              "--out", os.path.join(work, "run-fsdp")], {})}


def eval_run(device, work):
    questions = os.path.join(work, "questions.jsonl")
    with open(questions, "w") as f:
        f.write("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return {"eval.harness": ([sys.executable, "-m", "eval.harness", "--model", SHIPPED, "--tasks", "tess2_triviaqa",
                              "--data-files", f"train={questions},validation={questions}", "--steps", "2",
                              "--num-fewshot", "0", "--bootstrap-iters", "0", "--device", device,
                              "--output", os.path.join(work, "eval")], {})}


def log_name(name):
    return name.replace(" ", "_").replace("-", "") + ".log"


def launch(name, command, env, left, logs):
    """Runs one command for at most left() - 5 seconds (its share of the section's budget, taken when it
    starts); returns (rc or 'timeout', seconds, stdout). Its output goes to logs/NAME.log."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, left() - 5),
                           env={**os.environ, **env})
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
    with open(os.path.join(logs, log_name(name)), "w") as f:
        f.write(f"$ {' '.join(command)}\n{' '.join(f'{k}={v}' for k, v in env.items())}\n\n{stdout}\n"
                f"--- stderr\n{stderr}")
    return rc, time.monotonic() - t0, stdout


def texts(stdout):
    return [json.loads(line)["text"] for line in stdout.splitlines() if line.startswith("{")]


def train_check(work, folder):
    """The losses (and, on CUDA, the MFU) the run's log.jsonl recorded for its two steps."""
    with open(os.path.join(work, folder, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    ok = len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    mfu = f", MFU {steps[-1]['mfu']:.2%}" if "mfu" in steps[-1] else ""
    return ok, "losses " + ", ".join(f"{r['loss']:.4f}" for r in steps) + mfu


def check(name, stdout, work):
    """(ok, what was seen) for one run that exited with 0."""
    if name.startswith("sample"):
        got = texts(stdout)
        return len(got) == len(PROMPTS), f"{len(got)} answers"
    if name.startswith("train"):
        return train_check(work, "run-fsdp" if "fsdp" in name else "run-plain")
    with open(os.path.join(work, "eval", "results.json")) as f:
        res = json.load(f)["results"]["tess2_triviaqa"]
    return True, ", ".join(f"{k} {v}" for k, v in res.items() if isinstance(v, float))


def report(s, name, result, work):
    """One run's table row, written as it finishes; returns whether it passed."""
    rc, seconds, stdout = result
    ok, note = False, f"exit status {rc}" if rc != "timeout" else "stopped at its time limit"
    if rc == 0:
        try:
            ok, note = check(name, stdout, work)
        except (OSError, ValueError, KeyError) as e:
            note = f"ran, but its output is not as expected: {type(e).__name__}: {e}"
    if not ok:
        s.failed.append(name)
    s.row(f"`{name}`", "ok" if ok else "FAILED", f"{seconds:.0f}", note, f"b-logs/{log_name(name)}")
    return ok


def compare_compiled(s, results, smoke):
    """Each compiled sample.py run's text against the eager run's with the same seed and flags."""
    s.write("\nCompiled text against eager text (same seed and flags)" +
            (", dynamo disabled in the CPU smoke:" if smoke else ":"))
    for name in results:
        eager = name.replace(" --compile", "")
        if "--compile" in name and results[name][0] == 0 and results.get(eager, (None,))[0] == 0:
            same = texts(results[name][2]) == texts(results[eager][2])
            s.write(f"- `{name}` vs `{eager}`: {'the same' if same else 'DIFFERENT'}")
            s.record(**{f"same text: {name}": same})


def main():
    p = gpu_common.parser(__doc__)
    p.add_argument("--work", required=True, help="a scratch folder outside the repository")
    p.add_argument("--data", required=True, help="a tokens dataset for the miniature's tokenizer (bench/gpu_data.py)")
    a = p.parse_args()
    s = gpu_common.Section(a, "b-smoke", "(b) The product's CUDA paths on the shipped miniature")
    device = "cuda" if s.cuda else "cpu"
    logs = os.path.join(a.out, "b-logs")
    os.makedirs(logs, exist_ok=True)
    runs = {**sample_runs(device, a.cpu_smoke), **train_runs(device, a.data, a.work)}
    if importlib.util.find_spec("lm_eval"):
        runs.update(eval_run(device, a.work))
    else:
        s.write("\n`eval.harness`: skipped, lm-eval is not installed here (requirements-eval.txt)")
    s.table("run", "status", "seconds", "check", "log")
    results, passed = {}, 0
    with concurrent.futures.ThreadPoolExecutor(4 if s.cuda else 2) as pool:  # in order: the compiled runs first
        futures = {pool.submit(launch, name, cmd, env, s.left, logs): name for name, (cmd, env) in runs.items()}
        for done in concurrent.futures.as_completed(futures):  # rows as runs finish: a cut-off section keeps them
            name = futures[done]
            results[name] = done.result()
            passed += report(s, name, results[name], a.work)
    compare_compiled(s, results, a.cpu_smoke)
    s.record(runs={name: dict(rc=r[0], seconds=round(r[1], 1)) for name, r in results.items()})
    s.finish(f"{passed}/{len(runs)} runs ok")


if __name__ == "__main__":
    main()
