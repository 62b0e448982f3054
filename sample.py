"""
Sample from a TESS 2 simplex diffusion model: the reverse process (METHOD.md §9, paper Eq. 4-5,
Fig. 1) with reward guidance (§10, paper Sec. 3.4) and infilling.

    python sample.py --prompt "Write a sonnet about the sea."   # models/tess2-shakespeare
    python sample.py --model hamishivi/tess2 --prompt "..." --reward-model hamishivi/tess_mistral_rm
    python sample.py --no-chat --argmax --prompt "The <mask:3> sat on the <mask:2>."

A row is BOS + the prompt (context: clean tokens that never change) + a generation region (span)
that starts as pure noise. Prompt j of a run is sampled with seed + j from its own generators and
attends only to its own row, so its text does not depend on what else is in its batch.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import contextmanager

import torch

import tess2
from support.cli import run_cli
from support.hub import is_hub_id, read_config, read_json, resolve
from model import ModelArgs, Transformer
from support.prompts import Settings, decode_row, plan, settings_for
from support.tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))  # the default checkpoints are found from here
DEFAULT_MODEL = "models/tess2-shakespeare"
DEFAULT_REWARD_MODEL = "models/tess2-shakespeare-rm"  # with --eta and no --reward-model


# -----------------------------------------------------------------------------
# The reverse process (§9)


def renoise_(S, tokens, alpha_bar, generators, where):
    """tess2.renoise in S's own buffer, at span positions only (where = spans(span_mask)):
    S <- sqrt(alpha_bar) simplex(tokens)
    + sqrt(1 - alpha_bar) k eps, each row's eps drawn from its generator over its span positions, in
    order (one (n_span, V) draw per row). The rest of S is left as it is: predict reads S only at span
    positions. Scaled, shifted by -k sqrt(alpha_bar) and given +2k sqrt(alpha_bar) at each token: no
    second (B, L, V) tensor. alpha_bar is a float (one step for the whole batch)."""
    k = tess2.SIMPLEX_VALUE
    scale, shift, top = math.sqrt(1 - alpha_bar) * k, math.sqrt(alpha_bar) * k, 2 * k * math.sqrt(alpha_bar)
    for b, (g, w) in enumerate(zip(generators, where)):
        x = S[b, w] if isinstance(w, slice) else S.new_empty(len(w), S.shape[-1])  # (n_span, V)
        x.normal_(generator=g).mul_(scale).sub_(shift)
        x.scatter_add_(-1, tokens[b, w].unsqueeze(-1), torch.full_like(x[:, :1], top))
        if not isinstance(w, slice):
            S[b, w] = x
    return S


def spans(span_mask):
    """Each row's span positions: a slice where they are one run (the usual prompt-then-region row,
    so that S[b, where] is a view), else their indices."""
    out = []
    for row in span_mask:
        idx = row.nonzero().flatten()
        contiguous = len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx)
        out.append(slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx)
    return out


def project(logits, where, top_p, generators):
    """Eq. 5 on span positions only (where = spans(span_mask)): argmax (top_p None) or nucleus
    sampling with row b's positions drawn from generators[b]. logits (B, L, V) -> tokens (B, L),
    0 outside the span."""
    tokens = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    for b, (g, w) in enumerate(zip(generators, where)):
        tokens[b, w] = tess2.project(logits[b, w], top_p, g)  # (n_b,)
    return tokens


@torch.no_grad()
def diffuse(model, ids, span_mask, seeds, steps=100, top_p=0.99, guide=None, early_exit=None, lengths=None,
            on_step=None, predict=tess2.predict):
    """The reverse process on one batch. ids (B, L) context tokens (span positions are ignored),
    span_mask (B, L), seeds: one int per row, whose generator draws all its noise and nucleus
    samples; lengths: each row's own length (default: all L; the rest is masked out of attention).
    top_p None projects by argmax (paper Eq. 5), else by nucleus sampling (released default 0.99).
    guide(logits, rows) -> logits: reward guidance of the running rows. early_exit M: a row stops
    once the argmax of its span has not changed for M steps in a row, from half of the steps on
    (predictions settle late: bench/bench_early_exit.py); it then leaves the batch, and the other
    rows go on exactly as before. on_step(n, logits, best, rows) after each step, for the running rows.
    Returns tokens (B, L), the argmax of each row's final (guided) logits at span positions and
    ids elsewhere (released: the output is the argmax, not the last nucleus sample), and steps_used (B,)."""
    B, L = ids.shape
    V, N, dev = model.args.vocab_size, steps, ids.device
    lengths = list(lengths or [L] * B)
    generators = tess2.row_generators(seeds, dev)
    alpha_bars = tess2.alpha_bars(N).tolist()  # alpha_bar(i / N), i = 0..N-1
    # k N(0, I) at span positions (alpha_bar = 0); predict never reads S elsewhere, which stays 0
    where = spans(span_mask)  # each row's span positions, found once (a host sync per row)
    S = renoise_(torch.zeros(B, L, V, device=dev), ids, 0.0, generators, where)
    out, steps_used = ids.clone(), torch.full((B,), N, dtype=torch.long)
    rows = list(range(B))  # the running rows; below, every tensor holds just those
    logits, last_best, stable = None, None, torch.zeros(B, dtype=torch.long, device=dev)
    for n, i in enumerate(range(N - 1, -1, -1)):
        ids_r, span_r = ids[rows], span_mask[rows]
        key_mask = None if min(lengths) == L else torch.arange(L, device=dev) < torch.tensor(lengths, device=dev)[:, None]
        t = torch.full((len(rows),), i / N, device=dev)  # scaled time i / N, per row
        logits = predict(model, ids_r, span_r, S, t, logits, key_padding_mask=key_mask)  # (B', L, V)
        if guide is not None:
            logits = guide(logits, rows)  # guided logits feed the projection and the next self-conditioning
        best = ids_r.clone()  # (B', L): the argmax at span positions only
        for b, w in enumerate(where):
            best[b, w] = logits[b, w].argmax(-1)
        out[rows] = best
        if on_step is not None:
            on_step(n + 1, logits, best, rows)
        if i == 0:
            break
        if early_exit:
            stable = torch.where((best == last_best).all(-1), stable + 1, 0) if last_best is not None else stable
            leave = ((stable >= early_exit) & (n + 1 >= N / 2)).tolist()
            if any(leave):
                keep = [j for j, x in enumerate(leave) if not x]
                for j, x in enumerate(leave):
                    if x:
                        steps_used[rows[j]] = n + 1
                rows, generators, lengths, where = ([x[j] for j in keep] for x in (rows, generators, lengths, where))
                if not rows:
                    break
                S, logits, best, stable = (x[keep] for x in (S, logits, best, stable))
            last_best = best
        # S_{i-1} from the projection (Eq. 4-5); alpha_bar_{-1} = 1: no re-noising after i = 0
        tokens = best if top_p is None else project(logits, where, top_p, generators)
        renoise_(S, tokens, alpha_bars[i - 1], generators, where)
    return out, steps_used


# -----------------------------------------------------------------------------
# generate: prompts in, texts out


def check_pair(args: ModelArgs, tokenizer, rm_args: ModelArgs | None = None, rm_tokenizer=None):
    """A model and its tokenizer belong together (a tokenizer may lack only the [PAD] row that we
    added: sampling never needs it); a reward model must share them (§10)."""
    if tokenizer.vocab_size - tokenizer.pad_added > args.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size - tokenizer.pad_added} tokens but the model only "
                         f"{args.vocab_size}: they do not belong together")
    if args.head != "lm" or not args.timestep_embed:
        raise ValueError(f"the model is a {args.architecture}, not a diffusion model (a ...ForDiffusionLM with a "
                         "timestep embedding): adapt it first with train.py --stage adapt")
    if rm_args is None:
        return
    if rm_args.head != "score":
        raise ValueError("the reward model must have a score head (a ...ForSequenceClassification checkpoint)")
    if rm_args.vocab_size != args.vocab_size:
        raise ValueError(f"the reward model has a vocabulary of {rm_args.vocab_size} and the diffusion "
                         f"model {args.vocab_size}: reward guidance needs both to share one tokenizer")
    if rm_tokenizer is not None and rm_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"the tokenizers differ: model {tokenizer.fingerprint()}, reward model "
                         f"{rm_tokenizer.fingerprint()}; reward guidance needs both to share one tokenizer")


@contextmanager
def guidance_mode(rm, checkpointing: bool):
    """The reward model during guidance: frozen weights (so no activation is kept for their
    gradients) and, if asked, per-block recomputation in the backward. Restored afterwards."""
    flags = [p.requires_grad for p in rm.parameters()]
    old = getattr(rm, "gradient_checkpointing", False)
    rm.requires_grad_(False)
    rm.gradient_checkpointing = checkpointing
    try:
        yield rm
    finally:
        for p, f in zip(rm.parameters(), flags):
            p.requires_grad_(f)
        rm.gradient_checkpointing = old


def run(model, tokenizer, batches, s: Settings, reward_model=None, on_step=None, predict=tess2.predict):
    """Sample each batch -> list[Generation]. on_step(batch, n, logits, best, rows) after every step."""
    dev = model.embed_tokens.weight.device
    eta = s.eta if s.eta is not None else 0.25  # the paper's best for TESS 2 v0.1 (Table 3a)
    ckpt = dev.type == "cuda" if s.guidance_ckpt is None else s.guidance_ckpt
    out = []
    for batch in batches:
        ids, span_mask = batch.ids.to(dev), batch.span_mask.to(dev)
        last = torch.tensor(batch.lengths, device=dev) - 1  # the reward reads each row's last position

        def guide(x, rows):  # Eq. 9-11 on the running rows
            with guidance_mode(reward_model, ckpt):
                return tess2.reward_guidance(reward_model, x, ids[rows], span_mask[rows], eta, s.guidance_steps,
                                             s.tau, last_index=last[rows])
        step = None if on_step is None else lambda *a: on_step(batch, *a)  # noqa: E731
        t0 = time.perf_counter()
        tokens, steps_used = diffuse(model, ids, span_mask, batch.seeds, s.steps, s.top_p,
                                     guide if reward_model is not None and eta > 0 else None, s.early_exit,
                                     batch.lengths, step, predict)
        seconds = time.perf_counter() - t0
        for b, prompt in enumerate(batch.prompts):
            n = batch.lengths[b]
            g = decode_row(tokenizer, prompt, tokens[b, :n].tolist(), batch.span_mask[b, :n].tolist(), batch.ends[b])
            g.steps_used, g.seconds = int(steps_used[b]), seconds
            out.append(g)
    return out


def generate(model, tokenizer, prompts, settings: Settings | None = None, *, reward_model=None,
             reward_tokenizer=None, details=False, record=False, on_step=None, predict=tess2.predict, **overrides):
    """Generate a response for each prompt (a str or list of str) -> list[str]; with details=True
    (or record=True) a list of Generation: text, tokens, steps used, seconds and, if record, the
    per-step predictions and confidences. settings: a Settings, else the model's generation_config.json
    (or the released evaluation defaults); keyword overrides: any Settings field (steps=, top_p=,
    total_length=, length=, seed=, eta=, ...). Prompt j is sampled with seed + j."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if settings is None:
        settings = settings_for(getattr(model, "generation_config", None), model.args.max_length, **overrides)
    else:
        settings = dataclasses.replace(settings, **overrides).check()
    if settings.eta and reward_model is None:
        raise ValueError(f"eta = {settings.eta} needs a reward model: pass reward_model (--reward-model)")
    check_pair(model.args, tokenizer, reward_model.args if reward_model is not None else None, reward_tokenizer)
    if record:
        from support import views
        recorder = views.Recorder(on_step)
        on_step = recorder
    gens = run(model, tokenizer, plan(tokenizer, prompts, settings, model.args), settings, reward_model, on_step,
               predict)
    if record:
        recorder.attach(gens)
    return gens if details or record else [g.text for g in gens]


# -----------------------------------------------------------------------------
# Command line


def read_prompts(path):
    """One prompt per line; in a .jsonl file, a JSON string or {"prompt": ...} per line."""
    if os.path.isdir(path):
        raise ValueError(f"--prompts-file {path} is a directory: pass a text file, one prompt per line")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"--prompts-file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not path.endswith(".jsonl"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            o = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not JSON ({e.msg}); each line is a JSON string or "
                             "{\"prompt\": ...}") from None
        if isinstance(o, dict) and isinstance(o.get("prompt"), str):
            o = o["prompt"]
        if not isinstance(o, str):
            raise ValueError(f"{path}, line {n}: expected a JSON string or an object with a \"prompt\" string")
        prompts.append(o)
    return prompts


def checkpoint_dir(name, flag, default):
    """A local directory, or a Hub id (owner/name) fetched by support.hub.resolve. The default is a
    directory of this repository, found from this file wherever the command runs; it must exist."""
    path = os.path.join(HERE, name) if name == default else name
    if os.path.isdir(path) or (name != default and is_hub_id(name)):
        return resolve(path)
    hint = f" (the default {flag})" if name == default else ""
    raise ValueError(f"no checkpoint directory {path!r}{hint}: pass {flag} DIR, a directory holding config.json, "
                     "model.safetensors and tokenizer.json (or a Hub id such as hamishivi/tess2)")


def pick_device(name):
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: sampling runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU visible to PyTorch; use --device cpu")
    return dev


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Infilling: write <mask:N> in a "
                                "prompt for a gap of N tokens; the prompt is then used as written (no chat template). "
                                "Flags left out take the checkpoint's generation_config.json, else the released "
                                "evaluation's defaults (rows of 2048 positions, 100 steps, top-p 0.99).")
    arg = p.add_argument
    arg("--model", default=DEFAULT_MODEL, help=f"diffusion model: checkpoint directory or Hub id (default: "
        f"{DEFAULT_MODEL} of this repository)")
    arg("--prompt", action="append", help="a prompt (repeat for several); <mask:N> marks a gap")
    arg("--prompts-file", help="one prompt per line (.jsonl: a JSON string or {\"prompt\": ...} per line)")
    arg("--no-chat", action="store_true", help="do not wrap prompts in the Tulu chat template")
    arg("--steps", type=int, help="diffusion steps N")
    arg("--length", type=int, help="positions to generate after each prompt (instead of --total-length)")
    arg("--total-length", type=int, help="every row's length, prompt + region (released evaluation: 2048)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-p", type=float, help="nucleus sampling projection (released default 0.99)")
    g.add_argument("--argmax", action="store_true", help="argmax projection (paper Eq. 5)")
    arg("--reward-model", help="reward model for guidance: checkpoint directory or Hub id")
    arg("--eta", type=float, help=f"guidance step size (default 0.25 with --reward-model; --eta alone guides with "
        f"{DEFAULT_REWARD_MODEL} of this repository)")
    arg("--guidance-steps", type=int, help="gradient-ascent steps per diffusion step (released default 1)")
    arg("--tau", type=float, help="softmax temperature of the reward model's input (default 1)")
    arg("--no-guidance-ckpt", action="store_true", help="keep reward-model activations (default on CPU)")
    arg("--early-exit", type=int, help="stop a row once its argmax is unchanged for this many steps")
    arg("--seed", type=int, help="prompt j is sampled with seed + j (default 0)")
    arg("--batch-size", type=int, help="prompts per batch (default 8)")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    arg("--dtype", choices=["float32", "bfloat16", "float16"],
        help="weights and logits (default: bfloat16 on cuda, float32 on cpu)")
    arg("--threads", type=int, help="CPU threads (default: 1 for models under 50M parameters, else all cores)")
    arg("--compile", action="store_true", help="torch.compile the predict step")
    arg("--show", action="store_true", help="redraw the current text each step on stderr, shaded by confidence")
    arg("--html", help="write a page with the confidence of every position at every step")
    arg("--json", action="store_true", help="print one JSON object per prompt")
    a = p.parse_args(argv)
    names = ("steps", "length", "total_length", "seed", "batch_size", "eta", "guidance_steps", "tau", "early_exit")
    a.overrides = {k: getattr(a, k) for k in names if getattr(a, k) is not None}
    if a.top_p is not None or a.argmax:
        a.overrides["top_p"] = None if a.argmax else a.top_p
    if a.no_chat:
        a.overrides["chat"] = False
    if a.no_guidance_ckpt:
        a.overrides["guidance_ckpt"] = False
    return a


def prepare(a):
    """Everything the command line can check before loading weights: prompts, paths, configs,
    tokenizers, settings and every batch. Returns what main needs to load and run."""
    if a.threads is not None and a.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {a.threads}")
    Settings(**a.overrides).check()  # the flags' own values, before anything is read
    device = pick_device(a.device)
    prompts = (a.prompt or []) + (read_prompts(a.prompts_file) if a.prompts_file else [])
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT or --prompts-file FILE")
    if a.html:
        folder = os.path.dirname(os.path.abspath(a.html))
        if os.path.isdir(a.html) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"--html {a.html}: cannot write a file there (is the folder missing or read-only?)")
    path = checkpoint_dir(a.model, "--model", DEFAULT_MODEL)
    rm_name = a.reward_model or (DEFAULT_REWARD_MODEL if a.eta else None)  # --eta alone: the shipped one
    rm_path = checkpoint_dir(rm_name, "--reward-model", DEFAULT_REWARD_MODEL) if rm_name else None
    args, tok = ModelArgs.from_hf(read_config(path)), Tokenizer(path)
    rm_args = ModelArgs.from_hf(read_config(rm_path)) if rm_path else None
    rm_tok = Tokenizer(rm_path) if rm_path else None
    check_pair(args, tok, rm_args, rm_tok)
    gen_file = os.path.join(path, "generation_config.json")
    gen_cfg = read_json(gen_file, "generation config") if os.path.exists(gen_file) else None
    s = settings_for(gen_cfg, args.max_length, **a.overrides)
    return device, prompts, path, rm_path, tok, s, plan(tok, prompts, s, args)


def main(argv=None):
    a = parse_args(argv)
    device, prompts, path, rm_path, tok, s, batches = prepare(a)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    load = lambda d: Transformer.from_pretrained(d, dtype=dtype, device=device, verbose=False).eval()  # noqa: E731
    model, rm = load(path), load(rm_path) if rm_path else None
    if device.type == "cpu":  # small models run fastest on one thread (BENCHMARKS.md, "Threads")
        torch.set_num_threads(a.threads or (1 if model.num_params() < 50e6 else os.cpu_count()))
    from support import views
    watch = views.Watcher(tok, s.steps, a.show)
    recorder = views.Recorder(watch) if a.html else None
    # --compile: one graph for the whole step (tests: no graph break); on CUDA, replayed as a CUDA graph
    mode = "reduce-overhead" if device.type == "cuda" else None
    predict = torch.compile(tess2.predict, fullgraph=True, mode=mode) if a.compile else tess2.predict
    out = []
    for batch in batches:
        gens = run(model, tok, [batch], s, rm, recorder or watch, predict)
        watch.end()
        for g in gens:
            if not g.tokens or not g.text.strip():
                print(f"sample.py: note: prompt {len(out)} got an empty answer (the model ended it at once)",
                      file=sys.stderr)
            print(json.dumps(dict(prompt=g.prompt, text=g.text, tokens=g.tokens, steps_used=g.steps_used,
                                  seconds=round(g.seconds, 3))) if a.json else g.text + "\n" * (len(prompts) > 1),
                  flush=True)
            out.append(g)
    if a.html:
        recorder.attach(out)
        views.write_html(a.html, tok, out)
    return out


if __name__ == "__main__":
    run_cli(main, "sample.py")
