"""
TESS 2 as a model of lm-evaluation-harness (the `lm-eval` package, 0.4.x), registered as "tess2".

    python -m eval.harness --model hamishivi/tess2 --tasks gsm8k_cot --output out/gsm8k
    python -m eval.harness --model M --tasks tess2_ifeval --reward-model R --eta 0.25 --output out/ifeval

    import lm_eval, eval.harness
    lm_eval.simple_evaluate(model="tess2", model_args="pretrained=hamishivi/tess2,steps=100",
                            tasks=["gsm8k_cot"], task_manager=eval.harness.task_manager())

The paper's protocol (METHOD.md §11, paper App. D) is in eval/tasks/*.yaml; any task lm-eval has
works too. Requests and what answers them:

- generate_until: sample.generate (self-conditioned reverse diffusion, reward guidance if a
  reward model is given), prompts sorted by length and batched with the same max_gen_toks, the
  generation region `max_gen_toks` positions long (or every row `total_length` long, as the
  released evaluation padded to 2048), the Tulu chat template around each prompt (chat=True, for
  instruction-tuned checkpoints), the output cut at the first of the task's stop strings.
- loglikelihood, loglikelihood_rolling: a diffusion model has no exact likelihood. The estimate
  of log p(continuation | context) is minus the diffusion loss of METHOD.md §5 summed over the
  continuation's tokens, averaged over K = mc_samples draws of (t, eps): the row is BOS + context
  (clean tokens) + continuation (span); draw k has timestep t_k = floor((k + 1/2) T / K) (one in each
  K-th of [0, T): stratified, where training draws t uniformly) and noise eps_k from a generator
  seeded with seed + k; each draw is self-conditioned as in training's self-conditioned branch
  (the prediction at t_k + 1 with the same eps feeds the prediction at t_k). Every request uses
  the same K draws (common random numbers: the choices of a question see the same noise at the
  same positions), so the estimate is deterministic for a fixed seed and does not depend on batching.
  It is a score for ranking choices, not a normalised probability.

Every generation and score is appended to OUTPUT/generations.jsonl and OUTPUT/scores.jsonl keyed
by its request and settings: a run that stops can be started again with the same flags and only
the missing requests are computed. Progress (items/s, ETA) goes to stderr.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # lm-eval is the optional evaluation extra
    if __name__ == "__main__":
        sys.exit(f"eval.harness: error: lm-eval is not installed: pip install -r requirements-eval.txt ({e})")
    raise

import data.chat
import sample
import tess2
from model import Transformer
from support.cli import atomic_write, run_cli
from support.prompts import GUIDANCE_ETA, settings_for
from support.tokenizer import Tokenizer

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the shipped models are found from here
DEFAULT_MODEL = "models/tess2-shakespeare"
DEFAULT_REWARD_MODEL = "models/tess2-shakespeare-rm"
MAX_GEN_TOKS = 256  # positions generated for a request without max_gen_toks: lm-eval's default for its models


def task_manager(builtin: bool = True):
    """lm-eval's tasks plus the paper's (eval/tasks/); builtin=False: only ours (indexing lm-eval's
    ~15k task configs takes 15-30 s)."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=TASKS_DIR, include_defaults=builtin)


def ours(names) -> bool:
    """Whether every task name is one of eval/tasks/*.yaml."""
    return all(os.path.exists(os.path.join(TASKS_DIR, f"{n}.yaml")) for n in names)


def local_task(manager, name: str, data_files: dict) -> dict:
    """Task `name`'s config (a task name, or the path of its YAML file) with its data set replaced by
    local JSON/JSONL files, {split: path}: an offline copy of the data (or a test fixture). Returns
    the config dict that lm-eval's simple_evaluate takes in `tasks`."""
    from lm_eval.tasks._yaml_loader import load_yaml
    if name.endswith(".yaml") and os.path.isfile(name):
        path = name
    else:
        entry = manager._entry(name)
        if entry is None or entry.yaml_path is None:
            raise ValueError(f"--data-files needs a single task defined by a YAML file; {name!r} is not one")
        path = entry.yaml_path
    for split, file in data_files.items():
        if not os.path.isfile(file):
            raise ValueError(f"--data-files {split}={file}: no such file")
    cfg = load_yaml(path, resolve_func=True)
    cfg.pop("tag", None)
    return {**cfg, "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": dict(data_files)}}


class Progress:
    """A line on stderr at most every `every` seconds: done/total, items/s and the ETA."""

    def __init__(self, what: str, total: int, every: float = 10.0, stream=None):
        self.what, self.total, self.every, self.done = what, total, every, 0
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int):
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            print(f"tess2 {self.what}: {self.done}/{self.total} items, {rate:.2f} items/s, "
                  f"ETA {fmt_seconds(eta)}", file=self.stream, flush=True)


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Store:
    """An append-only JSONL file of {"key", ...} records, read back on start (resume). A line cut
    short by a crash is skipped. path None keeps the records in memory only."""

    def __init__(self, path: str | None):
        self.path, self.records = path, {}
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.records[r["key"]] = r

    def add(self, records: list[dict]):
        for r in records:
            self.records[r["key"]] = r
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def request_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cut_at_stop(text: str, until) -> str:
    """The text up to the first occurrence of any stop string."""
    until = [until] if isinstance(until, str) else list(until or [])
    ends = [text.find(s) for s in until if s and s in text]
    return text[:min(ends)] if ends else text


@register_model("tess2")
class TESS2(LM):
    """A TESS 2 checkpoint behind lm-eval's LM interface. Arguments (lm-eval's model_args) as the
    command line's flags; the sampling ones left None take the checkpoint's generation_config.json
    (support/prompts.settings_for), as sample.py does. model/tokenizer/reward/reward_tok take already
    loaded objects (Python callers, tests). length: positions generated when a request gives no
    max_gen_toks (lm-eval's default for its own models)."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, reward_model: str | None = None, eta=None, steps=None,
                 batch_size=None, top_p=None, argmax: bool = False, seed=None, chat=None, length: int = MAX_GEN_TOKS,
                 total_length=None, guidance_steps=None, tau=None, mc_samples: int = 8, device=None, dtype=None,
                 output=None, model=None, tokenizer=None, reward=None, reward_tok=None, progress_every: float = 10.0,
                 max_batch_size=None):
        super().__init__()  # max_batch_size: passed by lm-eval, unused (batches are --batch-size rows)
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dtype = dtype or (torch.bfloat16 if str(dev).startswith("cuda") else torch.float32)
        if model is None:
            pretrained = resolve_default(pretrained, DEFAULT_MODEL)
            model = Transformer.from_pretrained(pretrained, dtype=dtype, device=dev, verbose=False).eval()
            tokenizer = Tokenizer(pretrained)
        if reward is None and reward_model:
            reward_model = resolve_default(reward_model, DEFAULT_REWARD_MODEL)
            reward = Transformer.from_pretrained(reward_model, dtype=dtype, device=dev, verbose=False).eval()
            reward_tok = Tokenizer(reward_model)
        self.model, self.tok, self.reward, self.reward_tok = model, tokenizer, reward, reward_tok
        if eta and reward is None:
            raise ValueError(f"eta = {eta} needs a reward model: pass reward_model (--reward-model)")
        self.max_len = model.args.max_length  # the positions the model reads: its window, if it has one
        self.length, self.mc_samples = int(length), int(mc_samples)
        for name, value in (("length", self.length), ("mc_samples", self.mc_samples)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        # lm-eval hands model_args over as parsed strings: numbers and booleans, or None when not given
        number = lambda kind, x: None if x is None else kind(x)  # noqa: E731
        flags = dict(steps=number(int, steps), batch_size=number(int, batch_size), seed=number(int, seed),
                     chat=None if chat is None else bool(chat), total_length=number(int, total_length),
                     guidance_steps=number(int, guidance_steps), tau=number(float, tau), eta=number(float, eta),
                     **({"top_p": None} if argmax else {"top_p": number(float, top_p)} if top_p is not None else {}))
        # the checkpoint's settings, then the flags; requests give their own length (max_gen_toks)
        self.sampling = settings_for(getattr(model, "generation_config", None), self.max_len, length=self.length,
                                     **flags)
        self.progress_every = float(progress_every)
        self.name = str(pretrained if isinstance(pretrained, str) else "model")
        if output:
            os.makedirs(output, exist_ok=True)
        self.generations = Store(os.path.join(output, "generations.jsonl") if output else None)
        self.scores = Store(os.path.join(output, "scores.jsonl") if output else None)

    # -------------------------------------------------------------------------
    # generate_until

    def settings(self) -> dict:
        """What a generation depends on besides its request (the resume key)."""
        s = self.sampling
        return dict(model=self.name, steps=s.steps, top_p=s.top_p, seed=s.seed, chat=s.chat,
                    total_length=s.total_length, batch_size=s.batch_size, eta=s.eta if self.reward else None,
                    reward=bool(self.reward), guidance_steps=s.guidance_steps, tau=s.tau)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched sample.generate. Requests are sorted by (max_gen_toks, prompt length) so a batch
        wastes few positions; the batch starting at sorted index s is sampled with seed + s, so the
        same requests and settings give the same texts, resumed or not."""
        items = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            length = int(kwargs.get("max_gen_toks", self.length))
            context = self.fit(context, length)
            items.append((context, length, kwargs.get("until")))
        order = sorted(range(len(items)), key=lambda i: (items[i][1], len(items[i][0]), i))
        batches, cur = [], []
        for i in order:
            if cur and (len(cur) == self.sampling.batch_size or items[cur[0]][1] != items[i][1]):
                batches.append(cur)
                cur = []
            cur.append(i)
        batches += [cur] if cur else []
        out, progress, start = [None] * len(items), Progress("generate_until", len(items), self.progress_every), 0
        for batch in batches:
            keys = [request_key("gen", self.settings(), start, items[i][0], items[i][1]) for i in batch]
            if not all(k in self.generations.records for k in keys):
                self.generations.add(self.run_batch([items[i] for i in batch], keys, start))
            for i, k in zip(batch, keys):
                out[i] = cut_at_stop(self.generations.records[k]["raw"], items[i][2])
            progress.update(len(batch))
            start += len(batch)
        return out

    def run_batch(self, batch, keys, start) -> list[dict]:
        prompts, length, s = [c for c, _, _ in batch], batch[0][1], self.sampling
        t0 = time.perf_counter()
        texts = sample.generate(self.model, self.tok, prompts, steps=s.steps, top_p=s.top_p, seed=s.seed + start,
                                batch_size=len(prompts), chat=s.chat, total_length=s.total_length, length=length,
                                reward_model=self.reward, reward_tokenizer=self.reward_tok,
                                eta=s.eta if self.reward else None, guidance_steps=s.guidance_steps, tau=s.tau)
        seconds = time.perf_counter() - t0
        return [dict(key=k, context=c, max_gen_toks=n, until=u, raw=text, seconds=seconds)
                for k, (c, n, u), text in zip(keys, batch, texts)]

    def fit(self, context: str, length: int) -> str:
        """Drop the start of a context that, with its template and `length` generated positions,
        does not fit the model (as lm-eval does for causal models), keeping its last tokens."""
        room = (self.sampling.total_length or self.max_len) - length
        n = len(self.encode_context(context))
        if n <= room:
            return context
        ids = self.tok.encode(context)
        keep = len(ids) - (n - room) - 1  # one more token: re-encoding the cut text may merge differently
        if keep < 1:
            raise ValueError(f"a prompt's template and {length} generated positions do not fit the model's "
                             f"{self.max_len} positions: lower max_gen_toks or use a longer model")
        print(f"tess2: a context of {n} tokens was cut to its last {keep} to fit {room}", file=sys.stderr)
        return self.tok.decode(ids[-keep:])

    def encode_context(self, context: str) -> list[int]:
        """BOS + the context, in the Tulu template if chat (what sample.generate makes of a prompt)."""
        if self.sampling.chat:
            return data.chat.encode_prompt(self.tok, context)
        return [self.tok.bos_id] + self.tok.encode(context)

    # -------------------------------------------------------------------------
    # loglikelihood: the Monte Carlo estimate of the module docstring

    def encode_pair(self, context: str, continuation: str):
        """(context ids with BOS first, continuation ids). With chat, the context is templated and
        the continuation begins the assistant's reply; otherwise the pair is tokenized as one text
        and split where the context's tokens end (trailing spaces moved to the continuation)."""
        if self.sampling.chat:
            return self.encode_context(context), self.tok.encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.tok.encode(context)
        whole = self.tok.encode(context + continuation)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tok.encode(continuation)
        return [self.tok.bos_id] + ctx, cont

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [self.encode_pair(*r.args) for r in requests]
        return self.score_pairs(pairs, "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """A document's estimate: the sum over disjoint windows that fit the model, each window scored
        given the token before it (lm-eval's rolling windows, as its causal models do)."""
        windows, owner = [], []
        for j, r in enumerate(requests):
            ids = self.tok.encode(r.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    ids, prefix_token=self.tok.bos_id, max_seq_len=self.max_len - 2, context_len=1)):
                windows.append((ctx if ctx[:1] == [self.tok.bos_id] else [self.tok.bos_id] + ctx, cont))
                owner.append(j)
        scores = self.score_pairs(windows, "loglikelihood_rolling")
        out = [0.0] * len(requests)
        for j, (s, _) in zip(owner, scores):
            out[j] += s
        return out

    def score_pairs(self, pairs, what: str):
        """[(context ids, continuation ids)] -> [(estimated log-likelihood, is_greedy)], cached."""
        progress = Progress(what, len(pairs), self.progress_every)
        settings = dict(model=self.name, mc_samples=self.mc_samples, seed=self.sampling.seed)
        out = []
        for ctx, cont in pairs:
            if len(cont) >= self.max_len:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's "
                                 f"{self.max_len} positions with BOS before it")
            if len(ctx) + len(cont) > self.max_len:  # keep BOS, the context's end and the continuation
                ctx = [self.tok.bos_id] + ctx[len(ctx) + len(cont) - self.max_len + 1:]
            key = request_key("ll", settings, ctx, cont)
            if key not in self.scores.records:
                logp, greedy = estimate_loglikelihood(self.model, ctx, cont, self.mc_samples, self.sampling.seed,
                                                      self.sampling.batch_size)
                self.scores.add([dict(key=key, logp=logp, greedy=greedy)])
            r = self.scores.records[key]
            out.append((r["logp"], r["greedy"]))
            progress.update(1)
        return out


@torch.no_grad()
def estimate_loglikelihood(model, context: list[int], continuation: list[int], samples: int = 8,
                           seed: int = 0, chunk: int = 8):
    """The Monte Carlo estimate of log p(continuation | context) of the module docstring, and whether
    the continuation is the argmax at each of its positions of the log-probabilities averaged over
    the draws. context starts with BOS; continuation is non-empty."""
    if not continuation:
        raise ValueError("an empty continuation has no likelihood to estimate")
    dev = model.embed_tokens.weight.device
    T, V, n = tess2.NUM_TRAIN_STEPS, model.args.vocab_size, len(context)
    ids = torch.tensor(context + continuation, device=dev)  # (L,)
    L = ids.numel()
    span = torch.arange(L, device=dev) >= n  # (L,): the continuation is the span
    target = ids[n:]  # (C,)
    alpha_bar = tess2.alpha_bars(T).to(dev)  # (T,)
    logp_sum, total = torch.zeros(len(continuation), V, device=dev), 0.0
    for s in range(0, samples, chunk):
        k = torch.arange(s, min(s + chunk, samples))  # this chunk's draws
        t = ((k + 0.5) * T / samples).long().clamp(max=T - 1).to(dev)  # (b,) stratified timesteps
        t1 = (t + 1).clamp(max=T - 1)
        eps = tess2.row_noise([seed + int(j) for j in k], L, V, device=dev)  # (b, L, V)
        x, m = ids.expand(len(k), L), span.expand(len(k), L)  # (b, L)
        prev = tess2.predict(model, x, m, tess2.add_noise(x, eps, alpha_bar[t1]), t1 / T)  # self-conditioning input
        logits = tess2.predict(model, x, m, tess2.add_noise(x, eps, alpha_bar[t]), t / T, prev)  # (b, L, V)
        logp = F.log_softmax(logits[:, n:].float(), dim=-1)  # (b, C, V)
        total += logp.gather(-1, target.expand(len(k), -1).unsqueeze(-1)).sum().item()
        logp_sum += logp.sum(0)
        del eps, prev, logits, logp
    greedy = bool((logp_sum.argmax(-1) == target).all())
    return total / samples, greedy


def resolve_default(name: str, default: str) -> str:
    """The shipped default checkpoints are found in the repository's models/, wherever this is run from."""
    if name == default and not os.path.isdir(name):
        return os.path.join(ROOT, default)
    return name


# -----------------------------------------------------------------------------
# Command line


def parse_data_files(text: str | None) -> dict | None:
    """"test=a.jsonl,train=b.jsonl" -> {"test": "a.jsonl", "train": "b.jsonl"}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        split, sep, path = part.partition("=")
        if not sep or not split or not path:
            raise ValueError(f"--data-files wants SPLIT=PATH[,SPLIT=PATH...], got {text!r}")
        out[split.strip()] = path.strip()
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="eval.harness", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusion checkpoint: folder or Hub id")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (eval/tasks/ included)")
    p.add_argument("--output", required=True, help="folder for results.json, samples and the resumable cache")
    p.add_argument("--reward-model", help="reward model for guidance (with --eta)")
    p.add_argument("--eta", type=float, help=f"reward guidance step size (default {GUIDANCE_ETA} with --reward-model)")
    # sampling flags left out take the checkpoint's generation_config.json, as in sample.py
    p.add_argument("--guidance-steps", type=int, help="gradient steps per diffusion step (default: the checkpoint's)")
    p.add_argument("--steps", type=int, help="diffusion steps (default: the checkpoint's; the paper: 100)")
    p.add_argument("--batch-size", type=int, help="rows per sampling batch / draws per forward pass (default: "
                                                  "the checkpoint's)")
    p.add_argument("--top-p", type=float, help="nucleus projection (default: the checkpoint's; released: 0.99)")
    p.add_argument("--argmax", action="store_true", help="project by argmax (paper Eq. 5)")
    p.add_argument("--total-length", type=int, help="pad every row to this length (the released evaluation: 2048)")
    p.add_argument("--no-chat", dest="chat", action="store_const", const=False,
                   help="no Tulu chat template (base, not instruction-tuned, models)")
    p.add_argument("--seed", type=int, help="the batch at sorted request s is sampled with seed + s (default: "
                                            "the checkpoint's)")
    p.add_argument("--mc-samples", type=int, default=8, help="draws of (t, eps) per likelihood estimate")
    p.add_argument("--limit", type=float, help="items per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, help="override the tasks' number of examples")
    p.add_argument("--data-files", help="SPLIT=PATH,...: run the one task on local JSON/JSONL files")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval's bootstrap for standard errors")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    return p.parse_args(argv)


def check_output(path: str):
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output {path} is a file: give a folder")
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise ValueError(f"--output {path} is not writable")


def evaluate(lm, tasks, manager, output=None, limit=None, num_fewshot=None, bootstrap_iters=1000):
    """lm-eval's simple_evaluate, then results.json and one samples_<task>.jsonl per task in output."""
    import lm_eval
    if limit is not None:
        limit = int(limit) if limit >= 1 else limit
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=bootstrap_iters)
    if output:
        samples = res.pop("samples", {})
        for task, records in samples.items():
            atomic_write(os.path.join(output, f"samples_{task}.jsonl"),
                         "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in records))
        atomic_write(os.path.join(output, "results.json"), json.dumps(res, indent=2, default=str) + "\n")
        res["samples"] = samples
    return res


def main(argv=None):
    a = parse_args(argv)
    check_output(a.output)
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    files = parse_data_files(a.data_files)
    if files and len(names) != 1:
        raise ValueError("--data-files applies to one task: pass a single --tasks name")
    manager = task_manager(builtin=not ours(names))
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; ours are in {TASKS_DIR} "
                         "(`lm-eval ls tasks` lists lm-eval's)")
    tasks = [local_task(manager, names[0], files)] if files else names
    if a.eta and not a.reward_model:
        a.reward_model = DEFAULT_REWARD_MODEL
    lm = TESS2(pretrained=a.model, reward_model=a.reward_model, eta=a.eta, steps=a.steps, batch_size=a.batch_size,
               top_p=a.top_p, argmax=a.argmax, seed=a.seed, chat=a.chat, total_length=a.total_length,
               guidance_steps=a.guidance_steps, mc_samples=a.mc_samples, device=a.device, dtype=a.dtype,
               output=a.output)
    res = evaluate(lm, tasks, manager, a.output, a.limit, a.num_fewshot, a.bootstrap_iters)
    from lm_eval.utils import make_table
    print(make_table(res))
    print(f"results: {os.path.join(a.output, 'results.json')}")


if __name__ == "__main__":
    run_cli(main, "eval.harness")
