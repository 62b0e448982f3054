"""
train.py: every stage trains, and a step is the same step however it is computed.

A step's loss is normalised over the whole global batch and every random draw is keyed by the
global sample index (or the step), so gradient accumulation, 2 DDP processes, 2 FSDP2 processes
and a stopped-then-resumed run all reproduce one plain run. Models are model.preset("tiny"),
datasets a few hundred random tokens written with data.shards, everything on CPU in fp32.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import tess2
import train
from conftest import word_tokenizer
from support.cli import run_cli
from data.shards import open_dataset, write_pairs, write_spans, write_tokens
from model import Transformer, preset
from support.tokenizer import Tokenizer as ModelTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIGHT = dict(atol=1e-5, rtol=1e-5)
# weights after 4 AdamW steps: Adam divides by sqrt(v), so an element whose gradient is ~0 turns fp32
# summation-order noise (micro-batches, ranks) into an update of up to 1e-5 here; lr is 3e-3
WEIGHTS = dict(atol=1e-4, rtol=1e-5)


# -----------------------------------------------------------------------------
# tiny tokenizer and datasets


def make_tokenizer(folder, words=57):
    """A word-level tokenizer: <unk> <s> </s> w0..w56; tokenizer.Tokenizer adds [PAD] (id 60, V = 61)."""
    return word_tokenizer(folder, ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(words))])


def make_data(root, kind, n=24, seed=0, tok_dir=None):
    tok_dir = tok_dir or make_tokenizer(os.path.join(root, "tok"))
    info = ModelTokenizer(tok_dir)
    meta = dict(info.meta(), source="test")
    rng = np.random.default_rng(seed)
    words = lambda k: list(rng.integers(3, 60, k))
    path = os.path.join(root, f"{kind}-{seed}")
    if kind == "tokens":
        write_tokens(path, [words(rng.integers(5, 40)) + [info.eos_id] for _ in range(n * 4)], meta)
    elif kind == "spans":
        rows = []
        for _ in range(n):
            prompt = [info.bos_id] + words(rng.integers(2, 10))
            rows.append((prompt + words(rng.integers(2, 12)) + [info.eos_id], len(prompt)))
        write_spans(path, rows, meta)
    else:
        rows = []
        for _ in range(n):
            prompt = [info.bos_id] + words(rng.integers(2, 8))
            rows.append((prompt + words(rng.integers(2, 8)) + [info.eos_id],
                         prompt + words(rng.integers(2, 8)) + [info.eos_id], len(prompt)))
        write_pairs(path, rows, meta)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    tok = make_tokenizer(os.path.join(root, "tok"))
    out = {kind: make_data(root, kind, tok_dir=tok) for kind in ("tokens", "spans", "pairs")}
    out["val"] = make_data(root, "tokens", seed=1, tok_dir=tok)
    out["tok"] = tok
    return out


STAGE_DATA = dict(adapt="tokens", sft="spans", rm="pairs", ar="tokens")


def flags(stage, datasets, out, **kw):
    """Command-line flags of a tiny run; keyword arguments add or replace flags."""
    base = dict(stage=stage, init="scratch", preset="tiny", data=datasets[STAGE_DATA[stage]], out=str(out),
                seq_len=24, batch_size=4, micro_batch_size=1, max_steps=4, lr=3e-3, schedule="linear",
                warmup_steps=1, device="cpu", save_every=1000)
    argv = []
    for k, v in {**base, **kw}.items():
        if v is True:
            argv.append("--" + k.replace("_", "-"))
        elif v is not None and v is not False:
            argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def run(stage, datasets, out, **kw):
    train.main(flags(stage, datasets, out, **kw))
    return read_log(out)


def torchrun(stage, datasets, out, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", os.path.join(ROOT, "train.py"), *flags(stage, datasets, out, **kw)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        output = p.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # torchrun and its workers
        raise
    assert p.returncode == 0, output[-5000:]
    return read_log(out)


def read_text(path):
    return path.read_text() if path.exists() else ""


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return dict(train=[r for r in records if "loss" in r], val=[r for r in records if "val_loss" in r])


def losses(log):
    return [r["loss"] for r in log["train"]]


def weights(out, step):
    return load_file(os.path.join(out, f"step-{step:07d}", "model.safetensors"))


def assert_same_weights(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], **(tol or TIGHT), msg=k)


# -----------------------------------------------------------------------------
# pure pieces


def test_lr_schedules_at_chosen_steps():
    lr = train.lr_at
    assert lr(0, 1.0, 10, 100, "constant") == pytest.approx(0.1)   # warm-up starts above 0
    assert lr(9, 1.0, 10, 100, "constant") == pytest.approx(1.0)   # and reaches lr on its last step
    assert lr(5000, 1.0, 10, 100, "constant") == 1.0
    assert lr(10, 1.0, 10, 110, "linear") == pytest.approx(1.0)
    assert lr(60, 1.0, 10, 110, "linear") == pytest.approx(0.5)    # halfway down
    assert lr(110, 1.0, 10, 110, "linear") == 0.0
    assert lr(60, 1.0, 10, 110, "cosine") == pytest.approx(0.55)   # halfway between lr and lr/10
    assert lr(110, 1.0, 10, 110, "cosine") == pytest.approx(0.1)
    # the paper's SFT schedule: 3% warm-up then linear decay; adapt's: 5000 steps then constant
    assert lr(2, 1e-5, 3, 100, "linear") == pytest.approx(1e-5)
    assert lr(199_999, 1e-5, 5000, 200_000, "constant") == 1e-5


def test_a_sequence_draws_its_randomness_from_its_global_index(data):
    args = train.parse_args(flags("adapt", data, "unused", batch_size=8))
    ds = train.open_dataset(data["tokens"])
    whole = train.make_batch(args, ds, [3, 4, 5, 6])
    part = train.make_batch(args, ds, [5, 6])
    for k in ("ids", "t", "span_mask", "self_condition"):
        assert torch.equal(whole[k][2:], part[k])
    assert whole["noise_seeds"][2:] == part["noise_seeds"]
    assert len(set(whole["t"].tolist())) > 1  # but sequences differ from each other
    assert {train.self_condition_coin(0, s) for s in range(20)} == {True, False}


def test_the_seed_reaches_every_draw(data):
    """t, the UL2 mask, the noise and the self-conditioning coin: the same seed repeats them, and another
    seed (one bit apart, low or high) changes each of them."""
    ds = open_dataset(data["tokens"])

    def draws(seed):
        args = train.parse_args(flags("adapt", data, "unused", batch_size=16, seed=seed))
        b = train.make_batch(args, ds, list(range(16)))
        return dict(t=b["t"], mask=b["span_mask"], noise=tess2.row_noise(b["noise_seeds"], 4, 61),
                    coin=b["self_condition"])
    base = draws(0)
    for key, value in draws(0).items():
        assert torch.equal(value, base[key]), key
    for seed in (1, 2**42, 2**62):
        other = draws(seed)
        for key in base:
            assert not torch.equal(other[key], base[key]), (seed, key)


# -----------------------------------------------------------------------------
# one step, computed four ways


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """A plain run of the adapt stage: 1 process, micro-batch = global batch, with eval loss."""
    out = tmp_path_factory.mktemp("reference")
    log = run("adapt", data, out, micro_batch_size=4, val_data=data["val"], eval_every=2, eval_batches=2)
    return out, log


def test_gradient_accumulation_equals_the_large_batch(data, reference, tmp_path):
    ref_out, ref = reference
    log = run("adapt", data, tmp_path, micro_batch_size=1, val_data=data["val"], eval_every=2, eval_batches=2)
    assert_close(losses(log), losses(ref), **TIGHT)
    assert_close([r["val_loss"] for r in log["val"]], [r["val_loss"] for r in ref["val"]], **TIGHT)
    assert_same_weights(weights(tmp_path, 4), weights(ref_out, 4), **WEIGHTS)


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process(data, reference, tmp_path):
    ref_out, ref = reference
    log = torchrun("adapt", data, tmp_path, micro_batch_size=1, val_data=data["val"], eval_every=2, eval_batches=2)
    assert_close(losses(log), losses(ref), **TIGHT)
    assert_close([r["val_loss"] for r in log["val"]], [r["val_loss"] for r in ref["val"]], **TIGHT)
    assert_same_weights(weights(tmp_path, 4), weights(ref_out, 4), **WEIGHTS)


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process_across_a_resume(data, reference, tmp_path):
    """FSDP2 (fully_shard per block, then the root) over gloo on CPU, with activation checkpointing,
    stopped after step 2 and resumed: the sharded AdamW state is gathered and scattered back."""
    ref_out, ref = reference
    kw = dict(micro_batch_size=2, fsdp=True, grad_ckpt=True, val_data=data["val"], eval_every=2, eval_batches=2)
    torchrun("adapt", data, tmp_path, stop_at=2, **kw)
    log = torchrun("adapt", data, tmp_path, resume=True, **kw)
    assert [r["step"] for r in log["train"]] == [1, 2, 3, 4]
    assert_close(losses(log), losses(ref), **TIGHT)
    assert_close([r["val_loss"] for r in log["val"]], [r["val_loss"] for r in ref["val"]], **TIGHT)
    assert_same_weights(weights(tmp_path, 4), weights(ref_out, 4), **WEIGHTS)


SHARDED_LOAD = """
import json, os, resource, sys
import torch, torch.distributed as dist, torch.distributed.fsdp
import train
from data.shards import open_dataset
ckpt, data, out = sys.argv[1:]
dist.init_process_group("gloo")
args = train.parse_args(["--stage", "adapt", "--init", ckpt, "--data", data, "--out", out, "--fsdp", "--device", "cpu"])
meta, cpu = open_dataset(data).meta, torch.device("cpu")
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
torch.distributed.fsdp.fully_shard(torch.nn.Linear(2, 2))  # FSDP's own first-use cost (~35 MB), not the model's
before = peak()
net, _ = train.build_model(args, meta, ckpt, cpu, sharded=True)
train.wrap(args, net, True, cpu, bf16=False)
report = dict(load=peak() - before, local=sum(p.to_local().numel() * 4 for p in net.parameters()))
full = {k: p.full_tensor() for k, p in net.named_parameters()}
if dist.get_rank() == 0:
    before = peak()
    ref, _ = train.build_model(args, meta, ckpt, cpu)  # one process: from_pretrained, then grow_vocab
    report["single_load"] = peak() - before
    torch.save(dict(sharded=full, single=dict(ref.named_parameters())), os.path.join(out, "weights.pt"))
with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_ranks_read_only_their_shards_of_the_checkpoint(data, tmp_path):
    """--fsdp from a checkpoint: the model is built on the meta device, sharded, and each of 2 gloo ranks
    reads only its rows of each tensor (uneven splits: 61 vocabulary rows are 31 + 30). The sharded
    model equals the one-process load, [PAD]'s grown row and the new timestep embedding included, and
    each rank's memory grows by about its half of a 135 MB model, where the one-process load takes all."""
    torch.manual_seed(0)
    ar = Transformer(preset("tiny", vocab_size=60, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=8)).init_weights()
    ar.save_pretrained(str(tmp_path / "ar"), tokenizer_from=data["tok"])  # no [PAD] row, no timestep embedding
    size = sum(p.numel() * 4 for p in ar.parameters())
    del ar
    (tmp_path / "worker.py").write_text(SHARDED_LOAD)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(tmp_path / "worker.py"), str(tmp_path / "ar"), data["tokens"], str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    w = torch.load(out / "weights.pt", weights_only=True)
    assert w["sharded"].keys() == w["single"].keys()
    for k in w["single"]:
        assert_close(w["sharded"][k], w["single"][k], atol=1e-7, rtol=1e-6, msg=k)
    assert w["sharded"]["model.embed_tokens.weight"].shape == (61, 512)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"model {size / 2**20:.1f} MiB; per rank (MiB):",
          [{k: round(v / 2**20, 1) for k, v in r.items()} for r in ranks])
    for r in ranks:
        assert abs(r["local"] - size / 2) < 0.01 * size  # its half of the weights (V = 61 rows split 31 + 30)
        assert r["load"] < 0.75 * size, (r, size)  # the shard plus one tensor's rows in flight, never the model
    assert ranks[0]["single_load"] > 0.9 * size, (ranks[0], size)  # the contrast: the whole model at once


def test_a_stopped_run_resumes_exactly(data, tmp_path):
    """sft with linear decay: --stop-at 3 then --resume gives the uninterrupted run's losses and weights."""
    whole = run("sft", data, tmp_path / "whole", max_steps=6)
    first = run("sft", data, tmp_path / "cut", max_steps=6, stop_at=3)
    assert len(first["train"]) == 3 and os.path.isdir(tmp_path / "cut" / "step-0000003")
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume"):
        run("sft", data, tmp_path / "cut", max_steps=6)
    with pytest.raises(ValueError, match="trained with --batch-size 4, this run asks for 8"):
        run("sft", data, tmp_path / "cut", max_steps=6, resume=True, batch_size=8)
    # every flag that changes the run, and the data, must be the same: the message names the flag
    for kw, phrase in [(dict(ul2_prefix="paper"), "--ul2-prefix released, this run asks for paper: pass --ul2-prefix released"),
                       (dict(loss_weighting="token"), "--loss-weighting sequence, this run asks for token"),
                       (dict(max_steps=7), "--max-steps 6, this run asks for 7"),
                       (dict(data=make_data(str(tmp_path), "spans", seed=3, tok_dir=data["tok"])),
                        "trained on --data .*spans-0, this run's --data differs .*: pass --data")]:
        with pytest.raises(ValueError, match=phrase):
            run("sft", data, tmp_path / "cut", **{"max_steps": 6, "resume": True, **kw})
    assert json.loads((tmp_path / "cut" / "step-0000003" / "generation_config.json").read_text()) == {
        "steps": 100, "top_p": 0.99, "total_length": 24, "guidance_steps": 1, "tau": 1.0, "chat": True}
    resumed = run("sft", data, tmp_path / "cut", max_steps=6, resume=True)
    assert [r["step"] for r in resumed["train"]] == [1, 2, 3, 4, 5, 6]
    assert_close(losses(resumed), losses(whole), atol=0, rtol=0)
    assert_same_weights(weights(tmp_path / "cut", 6), weights(tmp_path / "whole", 6), atol=0, rtol=0)


def per_sequence_losses(net, args, ds, keys):
    """Each sequence's mean cross-entropy over its span targets, computed alone with tess2.diffusion_loss
    from the draws train.make_batch gives it (t, mask, noise seed, coin)."""
    b = train.make_batch(args, ds, keys)
    out = []
    for i in range(len(keys)):
        eps = tess2.row_noise(b["noise_seeds"][i:i + 1], args.seq_len, net.args.vocab_size)
        out.append(tess2.diffusion_loss(net, b["ids"][i:i + 1], b["span_mask"][i:i + 1], t=b["t"][i:i + 1],
                                        eps=eps, self_condition=bool(b["self_condition"][i]), reduction="sum"))
    return out  # [(sum, count)] per sequence


@pytest.mark.parametrize("weighting", ["sequence", "token"])
def test_one_step_is_adamw_on_the_loss_written_out(data, tmp_path, weighting):
    """The first step's weights are torch.optim.AdamW applied, in this test, to the loss written out here:
    the mean over the 4 sequences of each one's mean CE (sequence weighting, the default), or one mean
    over all their targets (token weighting). A normalisation error in train.py cannot hide."""
    kw = dict(max_steps=1, schedule="constant", warmup_steps=0, grad_clip=0, micro_batch_size=2,
              loss_weighting=weighting)
    run("adapt", data, tmp_path / "init", lr=0.0, **kw)  # lr 0: its step-1 weights are the initial ones
    log = run("adapt", data, tmp_path / "step", lr=1e-2, **kw)
    net = Transformer.from_pretrained(str(tmp_path / "init" / "step-0000001"))
    args = train.parse_args(flags("adapt", data, "unused", **kw))
    rows = per_sequence_losses(net, args, open_dataset(data["tokens"]), [0, 1, 2, 3])
    if weighting == "sequence":
        loss = sum(total / count for total, count in rows) / 4
    else:
        loss = sum(total for total, _ in rows) / sum(count for _, count in rows)
    assert log["train"][0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)
    loss.backward()
    # AdamW's first step is lr * g / (|g| + 1e-8): where |g| is near its eps (seen: 9e-9), fp32 summation
    # order alone (train.py sums the head's gradient chunk by chunk) moves it by a few % of lr
    noisy = {k: p.grad.abs() < 1e-7 for k, p in net.named_parameters()}
    opt.step()
    got = weights(tmp_path / "step", 1)
    for k, v in net.state_dict().items():
        assert_close(got[k][~noisy[k]], v.detach()[~noisy[k]], **WEIGHTS, msg=k)
        assert ((got[k] - v)[noisy[k]].abs() <= 1e-2).all(), k  # at most lr off


def test_held_out_loss_is_the_mean_of_each_held_out_sequences_loss(data, tmp_path):
    """val_loss at a step: the mean over the first --eval-batches x --batch-size held-out sequences of
    each one's mean CE, under the weights of that step (sequence weighting)."""
    log = run("adapt", data, tmp_path, max_steps=2, save_every=1, val_data=data["val"], eval_every=1,
              eval_batches=2)
    args = train.parse_args(flags("adapt", data, "unused"))
    for record in log["val"]:
        net = Transformer.from_pretrained(str(tmp_path / f"step-{record['step']:07d}"))
        with torch.no_grad():
            rows = per_sequence_losses(net, args, open_dataset(data["val"]), list(range(8)))
        assert record["val_loss"] == pytest.approx(sum(float(s / n) for s, n in rows) / 8, rel=1e-5)


# -----------------------------------------------------------------------------
# every stage learns


@pytest.mark.parametrize("stage", ["adapt", "sft", "rm", "ar"])
def test_each_stage_fits_a_fixed_batch(stage, data, tmp_path):
    """--overfit: one global batch over and over (diffusion still draws new t, noise and masks)."""
    steps = 150 if stage == "adapt" else 40  # adapt's UL2 spans are the hardest to memorise
    log = run(stage, data, tmp_path, overfit=True, max_steps=steps, lr=1e-2, schedule="constant",
              warmup_steps=2, log_every=1000)
    first, last = losses(log)[0], np.mean(losses(log)[-10:])
    assert last < 0.6 * first, (stage, first, last)


# -----------------------------------------------------------------------------
# checkpoints


def test_checkpoint_layout_and_keep_last(data, tmp_path):
    run("rm", data, tmp_path, max_steps=3, save_every=1, keep_last=2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step-")) == ["step-0000002", "step-0000003"]
    # resuming from step 2 while step 3 exists is refused, unless step 3 is moved aside; then step 3 is
    # saved again and nothing else is left behind
    with pytest.raises(ValueError, match="has later checkpoints .step-0000003.*--discard-later"):
        run("rm", data, tmp_path, max_steps=3, save_every=1, keep_last=2, resume=str(tmp_path / "step-0000002"))
    with pytest.raises(ValueError, match="trained with --batch-size 4"):  # refused before anything moves
        run("rm", data, tmp_path, max_steps=3, save_every=1, keep_last=2, resume=str(tmp_path / "step-0000002"),
            discard_later=True, batch_size=8)
    assert (tmp_path / "step-0000003").is_dir()
    run("rm", data, tmp_path, max_steps=3, save_every=1, keep_last=2, resume=str(tmp_path / "step-0000002"),
        discard_later=True)
    names = sorted(os.listdir(tmp_path))
    assert names[:1] == [".lock"] and names[2:] == ["log.jsonl", "step-0000002", "step-0000003"]
    assert names[1].startswith("discarded-") and os.listdir(tmp_path / names[1]) == ["step-0000003"]
    assert [r["step"] for r in read_log(tmp_path)["train"]] == [1, 2, 3]  # one history
    step = tmp_path / "step-0000003"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "train_state.pt", "train_state.json"):
        assert (step / f).exists(), f
    assert not (step / "generation_config.json").exists()  # a reward model is not sampled from
    state = torch.load(step / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and state["args"]["stage"] == "rm"
    info = json.loads((step / "train_state.json").read_text())
    assert info["step"] == 3 and info["data"]["samples_seen"] == 12
    rm = Transformer.from_pretrained(str(step))
    assert rm.args.head == "score" and rm.args.causal
    saved = ModelTokenizer(str(step)).fingerprint()  # what sample.py reads: the data's tokenizer, [PAD] included
    assert saved == ModelTokenizer(data["tok"]).fingerprint()
    assert (saved["vocab_size"], saved["bos_id"], saved["eos_id"], saved["pad_id"]) == (61, 1, 2, 60)


def test_an_ar_model_grows_a_pad_row_for_adaptation(data, tmp_path):
    """Mistral has 32000 ids, the data 32001 ([PAD]): the new row starts as the mean of the others."""
    torch.manual_seed(0)
    ar = Transformer(preset("tiny", vocab_size=60)).init_weights()
    ar.save_pretrained(str(tmp_path / "ar"), tokenizer_from=data["tok"])  # no [PAD] in it
    run("adapt", data, tmp_path / "run", init=str(tmp_path / "ar"), preset=None, max_steps=1, lr=0.0)
    w = weights(tmp_path / "run", 1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = getattr(ar.model.embed_tokens if "embed" in name else ar.lm_head, "weight").detach()
        assert w[name].shape == (61, 64)
        assert_close(w[name][:60], old)
        assert_close(w[name][60], old.mean(0))
    assert torch.equal(w["timestep_embed.weight"], torch.zeros(64, 1))
    cfg = json.loads((tmp_path / "run" / "step-0000001" / "config.json").read_text())
    assert cfg["vocab_size"] == 61 and cfg["timestep_embed"] and not cfg["causal"]
    generation = json.loads((tmp_path / "run" / "step-0000001" / "generation_config.json").read_text())
    assert generation == {"steps": 100, "top_p": 0.99, "total_length": 24, "guidance_steps": 1, "tau": 1.0,
                          "chat": False}  # adapt: plain text, rows of the trained length


# -----------------------------------------------------------------------------
# the run folder: one trainer at a time, nothing left behind, recovery


def test_a_second_trainer_on_the_same_out_stops_at_once_and_a_dead_ones_lock_is_free(data, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from support import run_folder; held = run_folder.lock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(120)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another trainer \(pid {holder.pid} on .+\)"):
            run("ar", data, tmp_path, max_steps=1)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the OS releases the lock
        holder.wait()
    assert len(run("ar", data, tmp_path, max_steps=1)["train"]) == 1


def test_leftovers_of_interrupted_saves_are_removed_and_a_torn_log_line_dropped(data, tmp_path, capsys):
    run("ar", data, tmp_path, max_steps=3, save_every=1, stop_at=2)
    # what kills leave: a save's unfinished folder, a pruned checkpoint half deleted, atomic_write's
    # temporary file, a torn last log line, and (killed between save_pretrained's two renames) step 2
    # absent with its finished new copy and its previous copy beside it
    (tmp_path / ".tmp-step-0000003-a1b2").mkdir()
    (tmp_path / ".tmp-step-0000003-a1b2" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".old-x9" / "x").mkdir(parents=True)
    (tmp_path / ".tmp-log.jsonl-7").write_text("{")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    os.rename(tmp_path / "step-0000002", tmp_path / ".tmp-step-0000002-q")
    os.mkdir(tmp_path / ".tmp-step-0000002-q-old")
    log = run("ar", data, tmp_path, max_steps=3, save_every=1, resume=True)
    assert "dropped a torn last line" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == [".lock", "log.jsonl", "step-0000001", "step-0000002", "step-0000003"]
    assert [r["step"] for r in log["train"]] == [1, 2, 3]
    whole = run("ar", data, tmp_path / "whole", max_steps=3)
    assert losses(log) == losses(whole)  # it resumed from the restored step 2


def children(pid):
    """The pids whose parent is pid (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def running(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_workers_stop_when_their_torchrun_launcher_dies(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(ROOT, "train.py"), *flags("ar", data, tmp_path, max_steps=100000, save_every=100000)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 180
        while not read_text(tmp_path / "log.jsonl") and time.time() < deadline:
            time.sleep(0.2)  # training has started
        workers = children(launcher.pid)
        assert len(workers) == 2, workers
        launcher.kill()  # SIGKILL: torchrun cannot stop its workers itself
        launcher.wait()
        deadline = time.time() + 60
        while any(map(running, workers)) and time.time() < deadline:
            time.sleep(0.2)
        alive = [w for w in workers if running(w)]
    finally:
        for w in [w for w in workers if running(w)]:
            os.kill(w, signal.SIGKILL)
    assert not alive, "orphaned workers kept training"
    assert len(run("ar", data, tmp_path, max_steps=1)["train"]) == 1  # and rank 0's lock went with it


@pytest.mark.parametrize("damage", ["train_state.pt", "model.safetensors", "train_state.json"])
def test_an_unreadable_latest_checkpoint_is_named_and_skipped_only_with_fallback(data, tmp_path, damage):
    run("ar", data, tmp_path, max_steps=4, save_every=1, stop_at=3)
    bad = tmp_path / "step-0000003" / damage
    if damage == "train_state.json":
        bad.unlink()
    else:
        bad.write_bytes(bad.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match=rf"step-0000003/{damage} is unreadable .*pass --fallback to resume "
                                         r"from .*step-0000002"):
        run("ar", data, tmp_path, max_steps=4, save_every=1, resume=True)
    log = run("ar", data, tmp_path, max_steps=4, save_every=1, resume=True, fallback=True)
    assert [r["step"] for r in log["train"]] == [1, 2, 3, 4]
    aside = [d for d in os.listdir(tmp_path) if d.startswith("discarded-")]
    assert len(aside) == 1 and os.listdir(tmp_path / aside[0]) == ["step-0000003"]  # kept, not deleted


FAULTY_TRAINER = """
import os, shutil, signal, sys
import train
from support.cli import run_cli
n, calls = int(os.environ["FAULT_AT"]), [0]

def deadly(f):  # SIGKILL this process just before its n-th rename, replace or rmtree
    def wrapper(*a, **kw):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return f(*a, **kw)
    return wrapper
os.rename, os.replace, shutil.rmtree = deadly(os.rename), deadly(os.replace), deadly(shutil.rmtree)
run_cli(train.main, "train.py", sys.argv[1:])
"""


@pytest.mark.slow
def test_killed_at_random_moments_and_resumed_it_is_the_unbroken_run(data, tmp_path):
    """SIGKILL inside saves (before each rename of save_pretrained), inside pruning (before the rmtree
    of --keep-last), inside log rewrites, at random times, and SIGTERM: each time resumed with --resume.
    The final weights and log equal an unbroken run's, and nothing is left behind."""
    kw = dict(max_steps=5, save_every=1, keep_last=2, val_data=data["val"], eval_every=2, eval_batches=1,
              micro_batch_size=2)
    whole = run("adapt", data, tmp_path / "whole", **kw)
    out, rng = tmp_path / "killed", random.Random(0)
    cmd = [sys.executable, "-c", FAULTY_TRAINER, *flags("adapt", data, out, resume=True, **kw)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    codes = []
    for attempt in range(10):
        # a whole run makes ~15 renames, replaces and rmtrees: die before one of the first 8 of this attempt's;
        # attempts 2 and 4 are killed from outside at a random time instead (4 by SIGTERM), the last ones not
        fault = rng.randint(1, 8) if attempt < 6 and attempt not in (2, 4) else 0
        p = subprocess.Popen(cmd, cwd=ROOT, env=dict(env, FAULT_AT=str(fault)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        if attempt in (2, 4):
            while attempt == 4 and f"pid {p.pid} " not in read_text(out / ".lock") and p.poll() is None:
                time.sleep(0.05)  # SIGTERM once train.main runs (before, Python's default handler just dies)
            time.sleep(rng.uniform(0.5, 3.0))
            p.send_signal(signal.SIGTERM if attempt == 4 else signal.SIGKILL)
        err = p.communicate(timeout=120)[1]
        codes.append(p.returncode)
        # -15: the SIGTERM came after main had returned and put Python's default handler back
        assert p.returncode in (0, -9, -15, 143), err[-3000:]
        if p.returncode in (0, 143):  # it cleaned up before exiting
            assert not [d for d in os.listdir(out) if d.startswith((".tmp-", ".old-"))]
        if p.returncode == 0 and [r["step"] for r in read_log(out)["train"]][-1:] == [5]:
            break
    assert codes.count(-9) >= 3 and codes[-1] == 0, codes
    assert sorted(os.listdir(out)) == [".lock", "log.jsonl", "step-0000004", "step-0000005"]
    assert_same_weights(weights(out, 5), weights(tmp_path / "whole", 5), atol=0, rtol=0)
    keys = ("step", "loss", "lr", "grad_norm")
    log = read_log(out)
    assert [[r[k] for k in keys] for r in log["train"]] == [[r[k] for k in keys] for r in whole["train"]]
    assert log["val"] == whole["val"]


# -----------------------------------------------------------------------------
# bad input: a clear error and no checkpoint


def no_checkpoint(out):
    return not os.path.exists(out) or not [d for d in os.listdir(out) if "step-" in d]


def test_missing_or_malformed_data(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset folder"):
        run("ar", data, tmp_path / "a", data=str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        run("ar", data, tmp_path / "b", data=str(broken))
    with pytest.raises(ValueError, match="--stage sft trains on spans data"):
        run("sft", data, tmp_path / "c", data=data["tokens"])
    assert no_checkpoint(tmp_path / "a") and no_checkpoint(tmp_path / "b") and no_checkpoint(tmp_path / "c")


def test_an_init_with_another_vocabulary_is_refused(data, tmp_path):
    ar = Transformer(preset("tiny", vocab_size=100)).init_weights()
    ar.save_pretrained(str(tmp_path / "ar"))  # no tokenizer: only the sizes can be compared
    with pytest.raises(ValueError, match="61 ids .* vocabulary of 100"):
        run("adapt", data, tmp_path / "run", init=str(tmp_path / "ar"))
    other = make_tokenizer(str(tmp_path / "other_tok"), words=40)  # 44 ids with [PAD]
    Transformer(preset("tiny", vocab_size=61)).save_pretrained(str(tmp_path / "ar2"), tokenizer_from=other)
    with pytest.raises(ValueError, match="tokenizer at .* differs"):
        run("adapt", data, tmp_path / "run", init=str(tmp_path / "ar2"))
    assert no_checkpoint(tmp_path / "run")


def test_a_sequence_longer_than_the_model_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="--seq-len 2048 is beyond"):
        run("ar", data, tmp_path, seq_len=2048)  # tiny: max_position_embeddings 1024
    assert no_checkpoint(tmp_path)


def test_a_non_finite_loss_stops_before_the_update(data, tmp_path):
    bad = Transformer(preset("tiny", vocab_size=61)).init_weights()
    with torch.no_grad():
        bad.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    bad.save_pretrained(str(tmp_path / "nan"), tokenizer_from=data["tok"])
    with pytest.raises(FloatingPointError, match="stopped before the optimizer step and saved nothing"):
        run("ar", data, tmp_path / "run", init=str(tmp_path / "nan"), save_every=1)
    assert no_checkpoint(tmp_path / "run")


def user_errors(data, tmp):
    """(case, argv of train.py, exit status, a phrase of its one-line message)."""
    (tmp / "a_file").write_text("")
    run_folder = tmp / "run"
    os.makedirs(run_folder / "step-0000004")
    return [
        ("--seq-len 0", dict(seq_len=0), 2, "argument --seq-len: must be a positive integer, got 0"),
        ("--seq-len 1", dict(seq_len=1), 2, "--seq-len 1: a row needs BOS and at least one target"),
        ("--save-every 0", dict(save_every=0), 2, "argument --save-every: must be a positive integer"),
        ("--max-steps 0", dict(max_steps=0), 2, "argument --max-steps: must be a positive integer"),
        ("--batch-size 0", dict(batch_size=0), 2, "argument --batch-size: must be a positive integer"),
        ("--keep-last -1", dict(keep_last=-1), 2, "argument --keep-last: must be 0 or a positive integer"),
        ("--epochs 0", dict(epochs=0, max_steps=None), 2, "--epochs 0.0 must be positive"),
        ("--lr nan", dict(lr="nan"), 2, "--lr nan must be a finite number"),
        ("batch not a multiple", dict(batch_size=3, micro_batch_size=2), 2, "--batch-size 3 must be a multiple"),
        ("--device cuda without CUDA", dict(device="cuda"), 2, "no CUDA device is visible here: pass --device cpu"),
        ("--fsdp without torchrun", dict(fsdp=True), 2, "launch with torchrun"),
        ("scratch without --preset", dict(preset=None), 2, "--init scratch needs --preset"),
        ("--init missing", dict(init=str(tmp / "nowhere")), 2, "no checkpoint folder"),
        ("--init a run folder", dict(init=str(run_folder)), 2,
         f"is a run folder: pass one of its checkpoints, e.g. {run_folder}/step-0000004"),
        ("--resume not a step folder", dict(resume=str(tmp)), 2, "expected no value (--out's latest checkpoint) or a step-XXXXXXX"),
        ("--out unwritable", dict(out=str(tmp / "a_file" / "run")), 2, "cannot write to --out"),
        ("--data missing", dict(data=str(tmp / "nowhere")), 2, "no dataset folder"),
        ("--data of another kind", dict(stage="sft", data=data["tokens"]), 2, "--stage sft trains on spans data"),
        ("--seq-len beyond the model", dict(seq_len=2048), 2, "--seq-len 2048 is beyond"),
    ]


def test_every_user_error_is_one_line_and_a_non_zero_exit(data, tmp_path, capsys):
    """Each case: no traceback, `train.py: error: ...` as the last line of stderr, exit status 2."""
    for case, kw, status, phrase in user_errors(data, tmp_path):
        out, stage = kw.pop("out", str(tmp_path / "out")), kw.pop("stage", "ar")
        with pytest.raises(SystemExit) as stop:
            run_cli(train.main, "train.py", flags(stage, data, out, **kw))
        err = capsys.readouterr().err
        assert stop.value.code == status, case
        assert "Traceback" not in err, case
        last = err.strip().splitlines()[-1]
        assert last.startswith("train.py: error:") and phrase in last, (case, last)
        assert no_checkpoint(tmp_path / "out"), case


def test_the_data_scripts_report_user_errors_as_one_line(data, tmp_path, capsys):
    from data import dolma, preferences, shakespeare, tulu
    tok = data["tok"]
    cases = [
        (dolma, ["--tokenizer", str(tmp_path / "no_tok"), "--input", "x.jsonl"], "no tokenizer folder or file"),
        (dolma, ["--tokenizer", tok, "--input", str(tmp_path / "missing.jsonl")], "no such file, folder or glob"),
        (dolma, ["--tokenizer", tok, "--input", "x.jsonl", "--max-tokens", "0"], "must be a positive integer"),
        (tulu, ["--tokenizer", tok, "--input", str(tmp_path / "bad.jsonl")], "bad.jsonl, line 2: not JSON"),
        (preferences, ["--tokenizer", tok, "--input", str(tmp_path / "bad.jsonl"), "--limit", "-1"],
         "must be a positive integer"),
        (shakespeare, ["--source-dir", str(tmp_path / "nowhere")], "no *_gut.txt under"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"messages": 3}\nnot json\n')
    for module, argv, phrase in cases:
        prog = f"python -m data.{module.__name__.split('.')[-1]}"
        with pytest.raises(SystemExit) as stop:
            run_cli(module.main, prog, [*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert stop.value.code == 2 and "Traceback" not in err and last.startswith(f"{prog}: error:"), last
        assert phrase in last, (argv, last)


def test_command_line_errors_are_one_clear_line(data, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                        *flags("ar", data, tmp_path, batch_size=3, micro_batch_size=2)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("train.py: error: --batch-size 3 must be a multiple")
    assert no_checkpoint(tmp_path)
