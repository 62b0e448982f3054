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
by its request and by what produced it (the checkpoint's and reward model's files, every setting,
the dtype and device): a run that stops can be started again with the same flags and only the
missing requests are computed; another model or other settings compute theirs anew. results.json
and the samples_<task>.jsonl files are replaced as one set. Progress (items/s, ETA) goes to stderr.

Refused before any weights load, with one line and nothing written: a flag out of its range, a
checkpoint that is not a diffusion model, a reward model of another tokenizer, an unknown task, and
--data-files that are not JSONL (or a JSON list) of objects, whose records lack a field the task
reads or hold it as another kind than the first record does (named by file, line and field).

Across processes: `torchrun --nproc_per_node N -m eval.harness ...` splits the generation batches
and the likelihood estimates over N processes (a batch keeps its seeds whichever process samples
it); every process receives every result, and the first writes OUTPUT: the results are those of one
process.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
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
from model import ModelArgs, Transformer
from support.cli import (ArgumentParser, OutputFolder, atomic_write, eta_flag, file_identity, number, replace_files,
                         run_cli, seed_flag)
from support.hub import read_config, read_json
from support.prompts import (GUIDANCE_ETA, SAMPLERS, Settings, pick_device, process_device, processes, settings_for,
                             spread)
from support.tokenizer import Tokenizer

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the shipped models are found from here
DEFAULT_MODEL = "models/tess2-shakespeare"
DEFAULT_REWARD_MODEL = "models/tess2-shakespeare-rm"
MAX_GEN_TOKS = 256  # positions generated for a request without max_gen_toks: lm-eval's default for its models


# -----------------------------------------------------------------------------
# What the evaluation tools share (eval.intrinsic, eval.sweep, eval.alpaca import it): checkpoints
# read before their weights, the device, one writer per output folder, answers sampled batch by
# batch (spread over the processes of a torchrun) into a store keyed by what produced them


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint as read before its weights: its folder, its config, its tokenizer and its sampling
    defaults (generation_config.json, or None)."""
    path: str
    args: ModelArgs
    tokenizer: Tokenizer
    generation_config: dict | None

    @classmethod
    def read(cls, name: str, flag: str, default: str | None = None) -> "Checkpoint":
        """A local folder or Hub id (the default, one of this repository's models/, found from here)."""
        path = sample.checkpoint_dir(name, flag, default)
        gen = os.path.join(path, "generation_config.json")
        return cls(path, ModelArgs.from_hf(read_config(path)), Tokenizer(path),
                   read_json(gen, "generation config") if os.path.exists(gen) else None)

    @property
    def config_file(self) -> str:
        """Its generation_config.json (named in a message about a bad value there)."""
        return os.path.join(self.path, "generation_config.json")

    def identity(self) -> dict:
        """What its files hold (support.cli.file_identity): weights, config and tokenizer."""
        return file_identity(self.path)

    def load(self, dtype, device) -> Transformer:
        return Transformer.from_pretrained(self.path, dtype=dtype, device=device, verbose=False).eval()


def check_scorer(scorer: Checkpoint, name: str):
    """A scorer of perplexity (and MAUVE's features) must be a causal language model."""
    if scorer.args.head != "lm" or scorer.args.timestep_embed:
        raise ValueError(f"--scorer {name} is a {scorer.args.architecture}: perplexity is measured under a causal "
                         "language model (a ...ForCausalLM checkpoint), not a diffusion or reward model")


def device_and_dtype(name: str | None):
    """(device, default dtype) for a --device flag (None: cuda if there is a GPU, else cpu), checked by
    support.prompts.pick_device; under torchrun "cuda" is each process's own GPU."""
    device = pick_device(process_device(name or ("cuda" if torch.cuda.is_available() else "cpu")))
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def sampling_flags(p):
    """--sampler and --shed, as sample.py has them (default: the checkpoint's, else stochastic and never)."""
    p.add_argument("--sampler", choices=SAMPLERS, help="re-noising: stochastic (fresh noise each step, as released) "
                   "or ddim (the noise implied by the prediction) (default: the checkpoint's, else stochastic)")
    p.add_argument("--shed", type=number(int, lo=1), metavar="M", help="a row stops computing its trailing [PAD] "
                   "once settled for M steps (default: the checkpoint's, else never)")


def output_folder(path: str, flag: str = "--output"):
    """support.cli.OutputFolder for the process that writes (the only one, or the first of a
    torchrun); the other processes write nothing."""
    return OutputFolder(path, flag) if processes()[0] == 0 else contextlib.nullcontext()


class Progress:
    """A line on stderr at most every `every` seconds: done/total, items/s and the ETA (from the first
    process of a torchrun only)."""

    def __init__(self, what: str, total: int, every: float = 10.0, stream=None):
        self.what, self.total, self.every, self.done = what, total, every, 0
        self.stream = stream or sys.stderr
        self.quiet = processes()[0] > 0
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int):
        self.done += n
        now = time.perf_counter()
        if not self.quiet and (now - self.last >= self.every or self.done == self.total):
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
    short by a crash is skipped. path None keeps the records in memory only, as does write=False
    (the processes of a torchrun but the first read the file and never write it)."""

    def __init__(self, path: str | None, write: bool = True):
        self.path, self.write, self.records = path, write, {}
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(r, dict) and "key" in r:
                        self.records[r["key"]] = r

    def add(self, records: list[dict]):
        for r in records:
            self.records[r["key"]] = r
        if self.path and self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def request_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def sample_answers(model, tok, prompts: list[str], s: Settings, store: Store, key, what: str,
                   **generate_kwargs) -> list[dict]:
    """Each prompt's answer {"key", "text", "tokens"}, batch by batch as sample.generate makes them:
    s.batch_size prompts a batch, the batch at prompt j sampled with seed s.seed + j, so that prompt j
    gets seed + j. Batches whose answers `store` holds (key(j) names prompt j's) are not sampled
    again; the others are spread over the processes of a torchrun (support.prompts.spread) and
    recorded in the store as they arrive. generate_kwargs: sample.generate's, over the checkpoint's."""
    starts = range(0, len(prompts), s.batch_size)
    todo = [j for j in starts
            if any(key(i) not in store.records for i in range(j, min(j + s.batch_size, len(prompts))))]
    progress = Progress(what, len(prompts))
    progress.update(len(prompts) - sum(min(s.batch_size, len(prompts) - j) for j in todo))

    def run(j):
        gens = sample.generate(model, tok, prompts[j:j + s.batch_size], details=True,
                               **dict(generate_kwargs, seed=s.seed + j, batch_size=s.batch_size))
        return [dict(key=key(j + i), text=g.text, tokens=g.tokens) for i, g in enumerate(gens)]

    for _, records in spread(todo, run):
        store.add(records)
        progress.update(len(records))
    return [store.records[key(i)] for i in range(len(prompts))]


def weights_identity(model) -> str:
    """sha256 of a loaded model's parameters (for a model handed over as an object, not as files)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Tasks, and local data files checked before anything runs


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


def kind(value) -> str:
    """A JSON value's kind, in words."""
    return ("an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else "a string"
            if isinstance(value, str) else "true or false" if isinstance(value, bool) else "a number"
            if isinstance(value, (int, float)) else "null")


def read_data_file(split: str, path: str) -> list[tuple[str, dict]]:
    """(where, record) of each record of a --data-files file: JSONL, one JSON object a line (where:
    "line N"), or one JSON list of objects ("item N"). Anything else is refused by file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--data-files {split}={path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    wants = "JSONL (one JSON object a line) or a JSON list of objects"
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {e.lineno}: not JSON ({e.msg}); --data-files takes {wants}") from None
        records = [(f"item {n}", o) for n, o in enumerate(items, 1)]
    else:
        records = []
        for n, line in enumerate(text.split("\n"), 1):
            try:
                records += [(f"line {n}", json.loads(line))] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e.msg}); --data-files takes {wants}") from None
    for where, o in records:
        if not isinstance(o, dict):
            raise ValueError(f"{path}, {where}: {kind(o)}, not an object; --data-files takes {wants}")
    if not records:
        raise ValueError(f"--data-files {split}={path} holds no records")
    return records


def shape_difference(first: dict, record: dict, first_where: str, prefix: str = "") -> str | None:
    """How a record's fields differ from the first record's (found at first_where): a field missing,
    or of another kind (objects compared field by field; null goes with any kind), or None."""
    for name, value in first.items():
        field = f"{prefix}{name}"
        if name not in record:
            return f"no field {field!r}, which {first_where} has"
        other = record[name]
        if value is not None and other is not None and kind(other) != kind(value):
            return f"field {field!r} is {kind(other)}, where {first_where} has {kind(value)}"
        if isinstance(value, dict) and isinstance(other, dict):
            found = shape_difference(value, other, first_where, f"{field}.")
            if found:
                return found
    return None


def field_names(record: dict, prefix: str = "") -> set[str]:
    """The dotted names of a record's fields, those of nested objects included."""
    names = set()
    for name, value in record.items():
        names.add(prefix + name)
        if isinstance(value, dict):
            names |= field_names(value, f"{prefix}{name}.")
    return names


def check_shape(files: dict, records: dict):
    """The --data-files are read as one table, with the first file's fields: every record must have
    the fields of the first record, each of the same kind, and the records of the other files no field
    the first file lacks. Else the table fails to build, far from the cause, or reads null."""
    splits = list(files)
    first_where, first = records[splits[0]][0]
    known = set().union(*(field_names(record) for _, record in records[splits[0]]))
    for split in splits:
        reference = first_where if split == splits[0] else f"{first_where} of {files[splits[0]]}"
        for where, record in records[split]:
            found = shape_difference(first, record, reference)
            extra = sorted(field_names(record) - known) if split != splits[0] else []
            if extra:
                found = f"field {extra[0]!r}, which {files[splits[0]]} lacks"
            if found:
                raise ValueError(f"{files[split]}, {where}: {found}: every record needs the fields of the first, "
                                 "each of the same kind")


def plain(x):
    """A record as JSON holds it: None fields dropped (the data set fills a missing field with None)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items() if v is not None}
    return [plain(v) for v in x] if isinstance(x, list) else x


def read_as_the_task_does(task, doc):
    """What a task reads of a document: its prompt, target and choices, and (a task's own function)
    its scoring of an empty answer."""
    task.doc_to_text(doc)
    task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        task.doc_to_choice(doc)
    if task.OUTPUT_TYPE == "generate_until" and callable(task.config.process_results):
        task.process_results(doc, [""])


JINJA_KINDS = {"dict": "an object", "str": "a string", "list": "a list", "int": "a number", "float": "a number",
               "NoneType": "null"}


def complaint(e: Exception) -> str:
    """A task's error on a document, said as the field it names."""
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    missing = re.fullmatch(r"'?(\w+)'? is undefined", message)
    if missing or isinstance(e, KeyError):
        return f"no field {missing.group(1) if missing else message!r}"
    attribute = re.fullmatch(r"'(\w+) object' has no attribute '(\w+)'", message)
    if attribute:
        return (f"it reads field {attribute.group(2)!r} of {JINJA_KINDS.get(attribute.group(1), attribute.group(1))}"
                ", which has none")
    return f"{type(e).__name__}: {message}"


def used_splits(cfg: dict, files: dict) -> list[str]:
    """The splits a task's config reads, each of which --data-files must give: the one it evaluates,
    and the one its examples come from (lm-eval reads it when it builds the task, however many
    examples are shown), unless the config lists its examples."""
    examples = cfg.get("fewshot_config") or {}
    used = [cfg.get("test_split") or cfg.get("validation_split"),
            cfg.get("fewshot_split") or examples.get("split") or (None if examples.get("samples") else
                                                                  cfg.get("training_split"))]
    for split in [x for x in used if x]:
        if split not in files:
            raise ValueError(f"--data-files has no {split}=FILE: task {cfg.get('task')} reads its {split} split")
    return list(dict.fromkeys(x for x in used if x))


def unreadable(cfg: dict, file: str, records: list, doc, e: Exception) -> ValueError:
    """The message for a document the task cannot read: its file and line, and the task's complaint."""
    where = next((w for w, r in records if plain(r) == plain(dict(doc))), "a record")
    return ValueError(f"{file}, {where}: task {cfg.get('task')} cannot read it: {complaint(e)}")


def data_task(manager, name: str, files: dict):
    """The task with its data from local files, every file and record checked before any weights
    load (read_data_file, check_shape, then every document of the splits it uses read as the task
    does): the lm-eval Task object simple_evaluate takes."""
    import datasets
    import jinja2
    cfg = local_task(manager, name, files)
    records = {split: read_data_file(split, path) for split, path in files.items()}
    check_shape(files, records)
    splits = used_splits(cfg, files)
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" for a few local records: noise before a message
    try:
        (task,) = manager.load([cfg])["tasks"].values()
    except (KeyError, TypeError, IndexError, jinja2.exceptions.UndefinedError) as e:
        # lm-eval reads the first document it evaluates while it builds the task
        docs = datasets.Dataset.from_list([r for _, r in records[splits[0]]])
        first = (cfg["process_docs"](docs) if cfg.get("process_docs") else docs)[0]
        raise unreadable(cfg, files[splits[0]], records[splits[0]], first, e) from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    for split in splits:
        docs = cfg["process_docs"](task.dataset[split]) if cfg.get("process_docs") else task.dataset[split]
        for doc in docs:
            try:
                read_as_the_task_does(task, doc)
            except Exception as e:  # the task's own templates and functions, on a user's data
                raise unreadable(cfg, files[split], records[split], doc, e) from None
    return task


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
    max_gen_toks (lm-eval's default for its own models). Under torchrun the work is spread over the
    processes (support.prompts.spread) and every process returns every result, so that lm-eval sees
    one process's run in each (it is told rank 0 of 1)."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, reward_model: str | None = None, eta=None, steps=None,
                 batch_size=None, top_p=None, argmax: bool = False, seed=None, chat=None, length: int = MAX_GEN_TOKS,
                 total_length=None, guidance_steps=None, tau=None, mc_samples: int = 8, device=None, dtype=None,
                 output=None, model=None, tokenizer=None, reward=None, reward_tok=None, progress_every: float = 10.0,
                 max_batch_size=None, sampler=None, shed=None):
        super().__init__()  # max_batch_size: passed by lm-eval, unused (batches are --batch-size rows)
        dev, default_dtype = device_and_dtype(device)
        dtype = (getattr(torch, dtype) if isinstance(dtype, str) else dtype) or default_dtype
        self.model, self.tok, model_identity = self.load(model, tokenizer, pretrained, DEFAULT_MODEL, dtype, dev)
        self.reward, self.reward_tok, reward_identity = None, None, None
        if reward is not None or reward_model:
            self.reward, self.reward_tok, reward_identity = self.load(reward, reward_tok, reward_model,
                                                                      DEFAULT_REWARD_MODEL, dtype, dev)
        if eta and self.reward is None:
            raise ValueError(f"eta = {eta} needs a reward model: pass reward_model (--reward-model)")
        self.max_len = self.model.args.max_length  # the positions the model reads: its window, if it has one
        self.length, self.mc_samples = int(length), int(mc_samples)
        for name, value in (("length", self.length), ("mc_samples", self.mc_samples)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        # lm-eval hands model_args over as parsed strings: numbers and booleans, or None when not given
        number = lambda kind, x: None if x is None else kind(x)  # noqa: E731
        flags = dict(steps=number(int, steps), batch_size=number(int, batch_size), seed=number(int, seed),
                     chat=None if chat is None else bool(chat), total_length=number(int, total_length),
                     guidance_steps=number(int, guidance_steps), tau=number(float, tau), eta=number(float, eta),
                     sampler=sampler, shed=number(int, shed),
                     **({"top_p": None} if argmax else {"top_p": number(float, top_p)} if top_p is not None else {}))
        # the checkpoint's settings, then the flags; requests give their own length (max_gen_toks)
        self.sampling = settings_for(getattr(self.model, "generation_config", None), self.max_len,
                                     length=self.length, **flags)
        self.progress_every = float(progress_every)
        weights = self.model.embed_tokens.weight  # what produced a result: the resume keys (settings)
        self.produced_by = dict(model=model_identity, reward=reward_identity, dtype=str(weights.dtype),
                                device=weights.device.type)
        writer = processes()[0] == 0
        if output and writer:
            os.makedirs(output, exist_ok=True)
        self.generations = Store(os.path.join(output, "generations.jsonl") if output else None, writer)
        self.scores = Store(os.path.join(output, "scores.jsonl") if output else None, writer)

    @staticmethod
    def load(model, tokenizer, name, default, dtype, device):
        """(model, tokenizer, identity): handed over as objects (identity: their weights and vocabulary),
        or read from a checkpoint folder or Hub id (identity: its files)."""
        if model is not None:
            return model, tokenizer, dict(weights=weights_identity(model), tokenizer=tokenizer and tokenizer.meta())
        path = sample.checkpoint_dir(name, "pretrained", default)
        model = Transformer.from_pretrained(path, dtype=dtype, device=device, verbose=False).eval()
        return model, Tokenizer(path), file_identity(path)

    # -------------------------------------------------------------------------
    # generate_until

    def settings(self) -> dict:
        """What a generation depends on besides its request (the resume key): what produced it and
        every setting."""
        s = self.sampling
        return dict(self.produced_by, steps=s.steps, top_p=s.top_p, seed=s.seed, chat=s.chat,
                    total_length=s.total_length, batch_size=s.batch_size, eta=s.eta if self.reward else None,
                    guidance_steps=s.guidance_steps, tau=s.tau, sampler=s.sampler, shed=s.shed)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched sample.generate. Requests are sorted by (max_gen_toks, prompt length) so a batch
        wastes few positions; the batch starting at sorted index s is sampled with seed + s, so the
        same requests and settings give the same texts, resumed or not, in one process or several."""
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
        starts = list(itertools.accumulate([0] + [len(b) for b in batches]))
        keys = [[request_key("gen", self.settings(), start, items[i][0], items[i][1]) for i in batch]
                for batch, start in zip(batches, starts)]
        progress = Progress("generate_until", len(items), self.progress_every)
        todo = [k for k, ks in enumerate(keys) if not all(x in self.generations.records for x in ks)]
        progress.update(len(items) - sum(len(batches[k]) for k in todo))
        run = lambda k: self.run_batch([items[i] for i in batches[k]], keys[k], starts[k])  # noqa: E731
        for k, records in spread(todo, run):
            self.generations.add(records)
            progress.update(len(records))
        out = [None] * len(items)
        for batch, ks in zip(batches, keys):
            for i, x in zip(batch, ks):
                out[i] = cut_at_stop(self.generations.records[x]["raw"], items[i][2])
        return out

    def run_batch(self, batch, keys, start) -> list[dict]:
        """One batch sampled: rows of prompt + max_gen_toks positions, or every row total_length long."""
        prompts, length, s = [c for c, _, _ in batch], batch[0][1], self.sampling
        t0 = time.perf_counter()
        texts = sample.generate(self.model, self.tok, prompts, steps=s.steps, top_p=s.top_p, seed=s.seed + start,
                                batch_size=len(prompts), chat=s.chat, total_length=s.total_length,
                                length=None if s.total_length else length, reward_model=self.reward,
                                reward_tokenizer=self.reward_tok, eta=s.eta if self.reward else None,
                                guidance_steps=s.guidance_steps, tau=s.tau, sampler=s.sampler, shed=s.shed)
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
        """[(context ids, continuation ids)] -> [(estimated log-likelihood, is_greedy)], cached; the
        estimates not cached are spread over the processes of a torchrun."""
        settings = dict(self.produced_by, mc_samples=self.mc_samples, seed=self.sampling.seed,
                        chunk=self.sampling.batch_size)
        fitted = []
        for ctx, cont in pairs:
            if len(cont) >= self.max_len:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's "
                                 f"{self.max_len} positions with BOS before it")
            if len(ctx) + len(cont) > self.max_len:  # keep BOS, the context's end and the continuation
                ctx = [self.tok.bos_id] + ctx[len(ctx) + len(cont) - self.max_len + 1:]
            fitted.append((request_key("ll", settings, ctx, cont), ctx, cont))
        todo = list({key: (key, ctx, cont) for key, ctx, cont in fitted if key not in self.scores.records}.values())
        progress = Progress(what, len(todo), self.progress_every)

        def run(job):
            key, ctx, cont = job
            logp, greedy = estimate_loglikelihood(self.model, ctx, cont, self.mc_samples, self.sampling.seed,
                                                  self.sampling.batch_size)
            return [dict(key=key, logp=logp, greedy=greedy)]

        for _, records in spread(todo, run):
            self.scores.add(records)
            progress.update(1)
        return [(self.scores.records[key]["logp"], self.scores.records[key]["greedy"]) for key, _, _ in fitted]


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


def item_limit(text: str):
    """--limit: a fraction of each task's items (in (0, 1)) or a whole number of them (>= 1)."""
    try:
        value = number(float, lo=0, lo_open=True)(text)
    except argparse.ArgumentTypeError:
        value = None
    if value is None or (value >= 1 and not value.is_integer()) or value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1) or a whole number of items >= 1, got {text}")
    return int(value) if value >= 1 else value


def parse_args(argv):
    positive = number(int, lo=1)
    p = ArgumentParser(prog="eval.harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="diffusion checkpoint: folder or Hub id")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (eval/tasks/ included)")
    p.add_argument("--output", required=True, help="folder for results.json, samples and the resumable cache")
    p.add_argument("--reward-model", help="reward model for guidance (with --eta)")
    p.add_argument("--eta", type=eta_flag,
                   help=f"reward guidance step size (default {GUIDANCE_ETA} with --reward-model)")
    # sampling flags left out take the checkpoint's generation_config.json, as in sample.py
    p.add_argument("--guidance-steps", type=positive, help="gradient steps per diffusion step (default: the "
                                                            "checkpoint's)")
    p.add_argument("--steps", type=positive, help="diffusion steps (default: the checkpoint's; the paper: 100)")
    p.add_argument("--batch-size", type=positive, help="rows per sampling batch / draws per forward pass (default: "
                                                       "the checkpoint's)")
    p.add_argument("--top-p", type=number(float, lo=0, hi=1, lo_open=True),
                   help="nucleus projection (default: the checkpoint's; released: 0.99)")
    p.add_argument("--argmax", action="store_true", help="project by argmax (paper Eq. 5)")
    sampling_flags(p)
    p.add_argument("--total-length", type=positive, help="pad every row to this length (the released "
                                                         "evaluation: 2048)")
    p.add_argument("--no-chat", dest="chat", action="store_const", const=False,
                   help="no Tulu chat template (base, not instruction-tuned, models)")
    p.add_argument("--seed", type=seed_flag, help="the batch at sorted request s is sampled with seed + s (default: "
                                                  "the checkpoint's)")
    p.add_argument("--mc-samples", type=positive, default=8, help="draws of (t, eps) per likelihood estimate")
    p.add_argument("--limit", type=item_limit, help="items per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=number(int, lo=0), help="override the tasks' number of examples")
    p.add_argument("--data-files", help="SPLIT=PATH,...: run the one task on local JSON/JSONL files")
    p.add_argument("--bootstrap-iters", type=number(int, lo=0), default=1000,
                   help="lm-eval's bootstrap for standard errors (0: none)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    return p.parse_args(argv)


def evaluate(lm, tasks, manager, output=None, limit=None, num_fewshot=None, bootstrap_iters=1000):
    """lm-eval's simple_evaluate, then results.json and one samples_<task>.jsonl per task in output,
    replacing the earlier ones as one set (support.cli.replace_files: results.json last). Under
    torchrun every process evaluates (TESS2 spreads the work) and the first writes."""
    import lm_eval
    if limit is not None and limit >= 1:
        limit = int(limit)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=bootstrap_iters)
    if output and res is not None and processes()[0] == 0:
        samples = res.pop("samples", {})
        staging = os.path.join(output, ".tmp-results")
        os.makedirs(staging, exist_ok=True)
        for task, records in samples.items():
            atomic_write(os.path.join(staging, f"samples_{task}.jsonl"),
                         "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in records))
        atomic_write(os.path.join(staging, "results.json"), json.dumps(res, indent=2, default=str) + "\n")
        earlier = [n for n in os.listdir(output) if n.startswith("samples_") and n.endswith(".jsonl")]
        replace_files(staging, output, "results.json", old=earlier)
        res["samples"] = samples
    return res


def checked_model(a):
    """The diffusion model (and reward model) the flags name, their configs and tokenizers checked
    and the row length against the model's, before any weights load."""
    model = Checkpoint.read(a.model, "--model", DEFAULT_MODEL)
    reward = Checkpoint.read(a.reward_model, "--reward-model", DEFAULT_REWARD_MODEL) if a.reward_model else None
    sample.check_pair(model.args, model.tokenizer, reward and reward.args, reward and reward.tokenizer)
    if a.total_length is not None and a.total_length > model.args.max_length:
        raise ValueError(f"--total-length {a.total_length} is longer than the {model.args.max_length} positions "
                         "the model reads")
    return model, reward


def main(argv=None):
    a = parse_args(argv)
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    files = parse_data_files(a.data_files)
    if files and len(names) != 1:
        raise ValueError("--data-files applies to one task: pass a single --tasks name")
    if a.eta and not a.reward_model:
        a.reward_model = DEFAULT_REWARD_MODEL
    model, reward = checked_model(a)
    device_and_dtype(a.device)
    manager = task_manager(builtin=not ours(names))
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; ours are in {TASKS_DIR} "
                         "(`lm-eval ls tasks` lists lm-eval's)")
    tasks = [data_task(manager, names[0], files)] if files else names
    with output_folder(a.output):
        lm = TESS2(pretrained=model.path, reward_model=reward and reward.path, eta=a.eta, steps=a.steps,
                   batch_size=a.batch_size, top_p=a.top_p, argmax=a.argmax, seed=a.seed, chat=a.chat,
                   total_length=a.total_length, guidance_steps=a.guidance_steps, mc_samples=a.mc_samples,
                   device=a.device, dtype=a.dtype, output=a.output, sampler=a.sampler, shed=a.shed)
        res = evaluate(lm, tasks, manager, a.output, a.limit, a.num_fewshot, a.bootstrap_iters)
    if processes()[0] == 0:
        from lm_eval.utils import make_table
        print(make_table(res))
        print(f"results: {os.path.join(a.output, 'results.json')}")


if __name__ == "__main__":
    run_cli(main, "eval.harness")
