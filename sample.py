"""
Sample from a TESS 2 simplex diffusion model: the reverse process (METHOD.md §9, paper Eq. 4-5,
Fig. 1) with reward guidance (§10, paper Sec. 3.4) and infilling.

    python sample.py --prompt "Write a sonnet about the sea."   # models/tess2-shakespeare
    python sample.py --model hamishivi/tess2 --prompt "..." --reward-model hamishivi/tess_mistral_rm
    python sample.py --no-chat --argmax --prompt "The <mask:3> sat on the <mask:2>."

A row is BOS + the prompt (context: clean tokens that never change) + a generation region (span)
that starts as pure noise. A batch in the reverse process is a `Denoising` state; `step` moves
every row of it one diffusion step on, and `diffuse` repeats it until every row is done. Each row
has its own generator, timestep, step count and projection, and attends only to itself: prompt j
of a run, sampled with seed + j, gives the same text whatever else is in its batch, and rows can
leave (early exit) or join (`join`) between steps.
"""
import dataclasses
import functools
import os
import time
from contextlib import contextmanager

import torch

import tess2
from model import ModelArgs, Transformer
from support import fused_sampling, views
from support.cli import ArgumentParser, eta_flag, number, run_cli, seed_flag
from support.hub import is_hub_id, read_config, read_json, resolve
from support.prompts import (GUIDANCE_ETA, SAMPLERS, Settings, decode_row, flag_prompts, given, pick_device, plan,
                             print_answers, process_device, processes, prompt_text, settings_for, spread)
from support.tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))  # the default checkpoints are found from here
DEFAULT_MODEL = "models/tess2-shakespeare"
DEFAULT_REWARD_MODEL = "models/tess2-shakespeare-rm"  # with --eta and no --reward-model


# -----------------------------------------------------------------------------
# The reverse process (§9): a batch's state, and one step of it


@dataclasses.dataclass
class Denoising:
    """A batch between two diffusion steps: B rows padded to L positions. Row b's settings and
    progress are entry b of each list. Rows leave (`leave`) and join (`join`) between steps."""
    ids: torch.Tensor  # (B, L) context tokens (span and padding positions hold placeholders, never read)
    span_mask: torch.Tensor  # (B, L) bool: the positions generated
    S: torch.Tensor  # (B, L, V) the noisy simplex at span positions (0 elsewhere: predict never reads it)
    logits: torch.Tensor | None  # (B, L, V) the last (guided) prediction: the next step's self-conditioning
    best: torch.Tensor  # (B, L) its argmax at span positions, ids elsewhere: each row's current text
    settled: torch.Tensor  # (B, L) int: for how many steps each position has been in its row's trailing [PAD]
    keys: list  # the caller's name for each row (diffuse: its index in the batch)
    lengths: list  # each row's own length: the positions after it (padding, its shed tail) are masked out of attention
    where: list  # each row's span positions (fused_sampling.span_positions)
    generators: list  # each row's generator: all its noise and nucleus draws, in order
    steps: list  # each row's number of diffusion steps N
    taken: list  # the steps each row has taken: it is at timestep i = N - 1 - taken
    top_p: list  # each row's projection: nucleus top-p, or None for argmax (paper Eq. 5)
    early_exit: list  # each row's M: it stops once its argmax is unchanged for M steps (None: never)
    stable: list  # for how many steps each row's argmax has been unchanged
    sampler: list  # each row's re-noising: "stochastic" (fresh noise, Eq. 4) or "ddim" (implied noise, Eq. D1-D2)
    shed: list  # each row's M: it sheds the trailing [PAD] that has been settled for M steps (None: never)
    pad_id: list  # each row's [PAD] token (None: never sheds)
    tails: list  # each row's shed tokens (its text after its length; span positions, whose noise it still draws)


def start(ids, span_mask, seeds, vocab_size, steps=100, top_p=0.99, early_exit=None, lengths=None, keys=None,
          sampler="stochastic", shed=None, pad_id=None):
    """A batch before its first step: S = k eps at span positions (alpha_bar = 0), row b's eps the first draw
    of a generator seeded by seeds[b]. ids (B, L), span_mask (B, L); steps, top_p, early_exit, sampler and shed
    hold for every row (rows with other settings: start them apart and `join`). sampler: "stochastic" (fresh noise
    each step, as released) or "ddim" (the noise implied by the prediction, METHOD.md §9). shed M: a row stops
    computing its trailing [PAD] (pad_id) once settled for M steps (None: never)."""
    if sampler not in ("stochastic", "ddim") or shed is not None and (pad_id is None or shed < 1):
        raise ValueError(f"sampler {sampler!r}: 'stochastic' or 'ddim'; shed {shed}: None or >= 1, with a pad_id")
    B, L = ids.shape
    generators, where = tess2.row_generators(seeds, ids.device), fused_sampling.span_positions(span_mask)
    S = fused_sampling.renoise_spans_(torch.zeros(B, L, vocab_size, device=ids.device), ids, [0.0] * B,
                                      generators, where)
    each = lambda x: [x] * B  # noqa: E731
    return Denoising(ids, span_mask, S, None, ids.clone(), torch.zeros_like(ids, dtype=torch.int32),
                     list(range(B) if keys is None else keys), list(lengths or each(L)), where, generators,
                     each(steps), each(0), each(top_p), each(early_exit), each(0), each(sampler), each(shed),
                     each(pad_id), each(ids.new_zeros(0)))


def leave(state, ended):
    """The rows `ended` (indices) leave the batch; the others keep their order."""
    stay = [b for b in range(len(state.keys)) if b not in ended]
    for f in dataclasses.fields(state):
        x = getattr(state, f.name)
        setattr(state, f.name, [x[b] for b in stay] if isinstance(x, list) else None if x is None else x[stay])


def join(state, other):
    """The rows of another batch (from `start`) join `state`, each at its own step. Both are padded
    to the longer L; padding is masked out of attention, so no row's positions see it. A row without
    a prediction yet gets zero logits beside the others: uniform, as None in tess2.predict."""
    L = max(state.ids.shape[1], other.ids.shape[1])
    widen = lambda x: torch.cat([x, x.new_zeros(x.shape[0], L - x.shape[1], *x.shape[2:])], 1)  # noqa: E731
    for f in dataclasses.fields(state):
        mine, theirs = getattr(state, f.name), getattr(other, f.name)
        if f.name == "logits" and (mine is None) != (theirs is None):
            mine, theirs = (torch.zeros_like(x.S) if x.logits is None else x.logits for x in (state, other))
        setattr(state, f.name, mine + theirs if isinstance(mine, list) else None if mine is None else
                torch.cat([widen(mine), widen(theirs)]))


def predict_rows(model, state, guide=None, compiled=False):
    """Each row's prediction at its timestep (Eq. 7-8; guided, Eq. 9-11, by guide(logits, state)),
    its argmax and early exit's count, into the state; each row has taken one more step."""
    L, dev = state.ids.shape[1], state.ids.device
    t = torch.tensor([(N - 1 - n) / N for N, n in zip(state.steps, state.taken)], device=dev)  # (B,) i / N
    key_mask = None if min(state.lengths) == L else \
        torch.arange(L, device=dev) < torch.tensor(state.lengths, device=dev)[:, None]  # (B, L) real positions
    predict = fused_sampling.compiled_predict() if compiled else tess2.predict
    logits = predict(model, state.ids, state.span_mask, state.S, t, state.logits, key_padding_mask=key_mask)
    if guide is not None:
        logits = guide(logits, state)  # guided logits feed the projection and the next self-conditioning
    best = fused_sampling.span_argmax(logits, state.ids, state.where)  # (B, L): the argmax at span positions only
    if any(m is not None for m in state.early_exit):
        same = (best == state.best).all(-1).tolist()  # (one host sync)
        state.stable = [s + 1 if unchanged and n > 0 else 0 for s, unchanged, n in zip(state.stable, same, state.taken)]
    state.logits, state.best, state.taken = logits, best, [n + 1 for n in state.taken]


@torch.no_grad()
def step(model, state, guide=None, on_step=None, compiled=False):
    """Every row of the batch one diffusion step on (§9), in place: its prediction at timestep i / N; after its
    last step (i = 0) or an early exit (argmax unchanged for M steps, from half of its steps on: bench_early_exit.py)
    it leaves; the others shed settled tails and get S_{i-1} from their projections (Eq. 4-5, or D1-D2). on_step(state)
    sees every prediction before the finished rows leave. Returns them, [(key, tokens (n,) of the row's n positions,
    steps taken)]: the final (guided) argmax at span positions (released: not the last sample), ids elsewhere, tail."""
    predict_rows(model, state, guide, compiled)
    if on_step is not None:
        on_step(state)
    ended = [b for b, (n, N, m, s) in enumerate(zip(state.taken, state.steps, state.early_exit, state.stable))
             if n == N or (m is not None and s >= m and 2 * n >= N)]
    finished = [(state.keys[b], fused_sampling.row_tokens(state, b), state.taken[b]) for b in ended]
    if ended:
        leave(state, ended)
    if state.keys:
        fused_sampling.shed_tails(state)
        fused_sampling.renoise_rows_(state)
    return finished


def diffuse(model, ids, span_mask, seeds, steps=100, top_p=0.99, guide=None, early_exit=None, lengths=None,
            on_step=None, compiled=False, sampler="stochastic", shed=None, pad_id=None):
    """The reverse process on one batch, `step` until every row is done: ids (B, L) context tokens, span_mask
    (B, L), seeds one int per row, lengths each row's own (default L), top_p None for argmax (paper Eq. 5), else
    nucleus (released 0.99); sampler, shed, pad_id: see `start`. Returns tokens (B, L), as `step`, and steps_used."""
    state = start(ids, span_mask, seeds, model.args.vocab_size, steps, top_p, early_exit, lengths, None, sampler,
                  shed, pad_id)
    tokens, steps_used = ids.clone(), torch.full((len(seeds),), steps, dtype=torch.long)
    while state.keys:
        for b, row, n in step(model, state, guide, on_step, compiled):
            tokens[b, :len(row)], steps_used[b] = row, n
    return tokens, steps_used


# -----------------------------------------------------------------------------
# Reward guidance (§10) and generate: prompts in, texts out


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


def recompute_reward_model(rm, tokens: int, vocab_size: int, device) -> bool:
    """Whether guidance recomputes the reward model's blocks in its backward: where what it keeps would
    not fit in the device's free memory. It keeps, weights frozen, about 6 D + 3 F + 2 D_kv values per
    token and layer (136 KiB at Mistral-7B's sizes in bf16: bench/bench_guidance_memory.py) and four
    fp32 (B, L, V) tensors (the logits guided, their softmax, its gradient, a temporary). Off on CPU."""
    if torch.device(device).type != "cuda":
        return False
    args = rm.args
    per_token = (6 * args.hidden_size + 3 * args.intermediate_size + 2 * args.num_key_value_heads * args.head_dim) \
        * args.num_hidden_layers * rm.embed_tokens.weight.element_size() + 4 * vocab_size * 4
    free, _ = torch.cuda.mem_get_info(device)
    return tokens * per_token > free


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


def reward_guide(rm, s: Settings, tokens: int, vocab_size: int, device):
    """guide(logits, state) for `step`: Eq. 9-11 on every row, its reward read at its last position;
    the reward model's blocks recomputed per s.guidance_ckpt, else if a batch of `tokens` needs it."""
    eta = GUIDANCE_ETA if s.eta is None else s.eta
    recompute = s.guidance_ckpt if s.guidance_ckpt is not None else \
        recompute_reward_model(rm, tokens, vocab_size, device)

    def guide(logits, state):
        last = torch.tensor(state.lengths, device=logits.device) - 1  # (B,)
        with guidance_mode(rm, recompute):
            return tess2.reward_guidance(rm, logits, state.ids, state.span_mask, eta, s.guidance_steps, s.tau,
                                         last_index=last)
    return guide


def run(model, tokenizer, batches, s: Settings, reward_model=None, on_step=None):
    """Sample each batch -> list[Generation]. on_step(batch, state) after every step (support/views.py)."""
    dev = model.embed_tokens.weight.device
    guided = reward_model is not None and (s.eta is None or s.eta > 0)
    out = []
    for batch in batches:
        ids, span_mask = batch.ids.to(dev), batch.span_mask.to(dev)
        guide = reward_guide(reward_model, s, ids.numel(), model.args.vocab_size, dev) if guided else None
        watch = None if on_step is None else functools.partial(on_step, batch)
        t0 = time.perf_counter()
        tokens, steps_used = diffuse(model, ids, span_mask, batch.seeds, s.steps, s.top_p, guide, s.early_exit,
                                     batch.lengths, watch, s.compile, s.sampler, s.shed,
                                     tokenizer.pad_id if s.shed else None)
        seconds = time.perf_counter() - t0
        for b, (prompt, n) in enumerate(zip(batch.prompts, batch.lengths)):
            g = decode_row(tokenizer, prompt, tokens[b, :n].tolist(), batch.span_mask[b, :n].tolist(), batch.ends[b])
            g.steps_used, g.seconds = int(steps_used[b]), seconds
            out.append(g)
    return out


def generate(model, tokenizer, prompts, *, reward_model=None, reward_tokenizer=None, details=False, record=False,
             **settings):
    """A response to each prompt -> list[str]; with details=True (or record=True) a list of Generation:
    text, tokens, steps used, seconds and, if record, the per-step predictions and confidences. A prompt
    is a str or a chat, a list of {"role", "content"} messages ending with the user's (rendered in the
    chat template, every turn: support/prompts.encode_prompt); prompts: one prompt or a list of them.
    settings: Settings fields (steps=, top_p=, length=, seed=, eta=, shed=, sampler=, ...) over the
    model's generation_config.json (support/prompts.settings_for; None: the checkpoint's, but
    top_p=None: argmax). Prompt j is sampled with seed + j."""
    one = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
    prompts = [prompts] if one else list(prompts)
    s = settings_for(getattr(model, "generation_config", None), model.args.max_length, **settings)
    if s.eta and reward_model is None:
        raise ValueError(f"eta = {s.eta} needs a reward model: pass reward_model (--reward-model)")
    if record and s.shed:
        raise ValueError("record=True keeps every position's prediction at every step, but shed stops computing "
                         "some of them: pass shed=None to record")
    check_pair(model.args, tokenizer, reward_model.args if reward_model is not None else None, reward_tokenizer)
    recorder = views.Recorder() if record else None
    gens = run(model, tokenizer, plan(tokenizer, prompts, s, model.args), s, reward_model, recorder)
    if record:
        recorder.attach(gens)
    return gens if details or record else [g.text for g in gens]


# -----------------------------------------------------------------------------
# Command line


def checkpoint_dir(name, flag, default):
    """A local directory, or a Hub id (owner/name) fetched by support.hub.resolve. The default is a
    directory of this repository, found from this file wherever the command runs; it must exist."""
    path = os.path.join(HERE, name) if name == default else name
    if os.path.isdir(path) or (name != default and is_hub_id(name)):
        return resolve(path)
    hint = f" (the default {flag})" * (name == default)
    raise ValueError(f"no checkpoint directory {path!r}{hint}: pass {flag} DIR, a directory holding config.json, "
                     "model.safetensors and tokenizer.json (or a Hub id such as hamishivi/tess2)")


def parse_args(argv=None):
    """The flags, each number in its declared range (support.cli); those named as Settings fields
    default to None: the checkpoint's (support/prompts.py)."""
    p = ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0].strip(), epilog="Infilling: write "
                       "<mask:N> in a prompt for a gap of N tokens; the prompt is then used as written (no chat "
                       "template). Flags left out take the checkpoint's generation_config.json, else the released "
                       "evaluation's defaults (rows of 2048 positions, 100 steps, top-p 0.99). Under torchrun "
                       "--nproc_per_node N the batches are spread over N processes; the first prints and writes.")
    arg, positive = p.add_argument, number(int, lo=1)
    arg("--model", default=DEFAULT_MODEL, help=f"diffusion model: checkpoint directory or Hub id (default: "
        f"{DEFAULT_MODEL} of this repository)")
    arg("--prompt", action="append", help="a prompt (repeat for several); <mask:N> marks a gap")
    arg("--prompts-file", help="one prompt per line (.jsonl: a JSON string, {\"prompt\": ...} or a chat "
        "{\"messages\": [{\"role\", \"content\"}, ...]} per line)")
    arg("--no-chat", dest="chat", action="store_const", const=False, help="no Tulu chat template around prompts")
    arg("--steps", type=positive, help="diffusion steps N")
    arg("--length", type=number(int, lo=0), help="positions to generate after each prompt (instead of "
        "--total-length; 0 with <mask:N> gaps: only the gaps)")
    arg("--total-length", type=positive, help="every row's length, prompt + region (released evaluation: 2048)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-p", type=number(float, lo=0, hi=1, lo_open=True),
                   help="nucleus sampling projection (released default 0.99)")
    g.add_argument("--argmax", action="store_true", help="argmax projection (paper Eq. 5)")
    arg("--sampler", choices=SAMPLERS, help="re-noising: stochastic (fresh noise each step, as released; the "
        "default) or ddim (the noise implied by the prediction: deterministic given the first noise)")
    arg("--shed", type=positive, metavar="M", help="a row stops computing its trailing [PAD] once it has been "
        "settled for M steps (default: never)")
    arg("--reward-model", help="reward model for guidance: checkpoint directory or Hub id")
    arg("--eta", type=eta_flag, help=f"guidance step size (default {GUIDANCE_ETA} with --reward-model; --eta alone "
        f"guides with {DEFAULT_REWARD_MODEL} of this repository)")
    arg("--guidance-steps", type=positive, help="gradient-ascent steps per diffusion step (released default 1)")
    arg("--tau", type=number(float, lo=0, lo_open=True), help="softmax temperature of the reward model's input "
        "(default 1)")
    arg("--no-guidance-ckpt", dest="guidance_ckpt", action="store_const", const=False,
        help="keep reward-model activations (default: recompute them only where they would not fit in memory)")
    arg("--early-exit", type=positive, help="stop a row once its argmax is unchanged for this many steps")
    arg("--seed", type=seed_flag, help="prompt j is sampled with seed + j (default 0)")
    arg("--batch-size", type=positive, help="prompts per batch (default 8)")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (under torchrun: "
        "each process's own GPU)")
    arg("--dtype", choices=["float32", "bfloat16", "float16"],
        help="weights and logits (default: bfloat16 on cuda, float32 on cpu)")
    arg("--threads", type=positive, help="CPU threads (default: 1 for models under 50M parameters, else all cores)")
    arg("--compile", action="store_const", const=True, help="torch.compile the model pass of each step")
    arg("--show", action="store_true", help="redraw the current text each step on stderr, shaded by confidence")
    arg("--html", help="write a page with the confidence of every position at every step")
    arg("--json", action="store_true", help="print one JSON object per prompt")
    a = p.parse_args(argv)
    if a.length is not None and a.total_length is not None:
        p.error("--length and --total-length both set the length of a row: give one (--length N: N positions "
                "after each prompt; --total-length L: rows of L positions)")
    a.overrides = given(a)
    return a


def prepare(a):
    """Everything the command line can check before loading weights: prompts, paths, configs,
    tokenizers, settings and every batch. Returns what main needs to load and run."""
    Settings(**a.overrides).check()  # the flags' own values, before anything is read
    device = pick_device(process_device(a.device))
    prompts = flag_prompts(a.prompt, a.prompts_file)
    if a.html:
        views.check_html_path(a.html)
    path = checkpoint_dir(a.model, "--model", DEFAULT_MODEL)
    rm_name = a.reward_model or (DEFAULT_REWARD_MODEL if a.eta else None)  # --eta alone: the shipped one
    rm_path = checkpoint_dir(rm_name, "--reward-model", DEFAULT_REWARD_MODEL) if rm_name else None
    args, tok = ModelArgs.from_hf(read_config(path)), Tokenizer(path)
    rm_args = ModelArgs.from_hf(read_config(rm_path)) if rm_path else None
    rm_tok = Tokenizer(rm_path) if rm_path else None
    check_pair(args, tok, rm_args, rm_tok)
    gen_file = os.path.join(path, "generation_config.json")
    gen_cfg = read_json(gen_file, "generation config") if os.path.exists(gen_file) else None
    s = settings_for(gen_cfg, args.max_length, gen_file, **a.overrides)
    if a.html and s.shed:
        raise ValueError(f"--html records every position at every step, but shedding (--shed {s.shed}"
                         f"{'' if a.shed else ', from ' + gen_file}) stops computing some of them: leave out one")
    return device, prompts, path, rm_path, tok, s, plan(tok, prompts, s, args)


def main(argv=None):
    """Under torchrun the batches are spread over the processes (support.prompts.spread: each batch
    keeps its seeds); the first process prints every answer, in prompt order, and writes --html."""
    a = parse_args(argv)
    device, prompts, path, rm_path, tok, s, batches = prepare(a)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    load = lambda d: Transformer.from_pretrained(d, dtype=dtype, device=device, verbose=False).eval()  # noqa: E731
    model, rm = load(path), load(rm_path) if rm_path else None
    if device.type == "cpu":  # small models run fastest on one thread (BENCHMARKS.md, "Threads")
        torch.set_num_threads(a.threads or (1 if model.num_params() < 50e6 else os.cpu_count()))
    first = processes()[0] == 0
    watch = views.Watcher(tok, a.show) if first else None

    def sample_batch(batch):  # -> its Generations, with their traces (CPU tensors) for --html
        recorder = views.Recorder(watch) if a.html else None
        gens = run(model, tok, [batch], s, rm, recorder or watch)
        if watch is not None:
            watch.end()
        return recorder.attach(gens) if recorder else gens

    out = print_answers(spread(batches, sample_batch), first, a.json, len(prompts) > 1)
    if a.html and first:
        views.write_html(a.html, tok, [dataclasses.replace(g, prompt=prompt_text(g.prompt)) for g in out])
    return out


if __name__ == "__main__":
    run_cli(main, "sample.py")
