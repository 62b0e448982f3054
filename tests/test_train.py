"""
train.py: every stage trains, and a step is the same step however it is computed.

A step's loss is normalised over the whole global batch and every random draw is keyed by the
global sample index (or the step), so gradient accumulation, 2 DDP processes, 2 FSDP2 processes
and a stopped-then-resumed run all reproduce one plain run; each sequence's draws (t and its UL2
mask, noise, self-conditioning coin) come from three streams restated here from their hash, and
the coin decides its loss. Models are model.preset("tiny"), datasets a few hundred random tokens
written with data.shards (tests/train_runs.py), everything on CPU in fp32.
"""
import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import safetensors.torch
import torch
from torch.testing import assert_close

import tess2
import train
from data.shards import open_dataset
from model import Transformer, preset
from support import checkpoint, run_folder
from support.cli import run_cli
from test_fused_loss import loss_by_hand
from train_runs import (ROOT, TIGHT, WEIGHTS, assert_same_weights, flags, losses, make_data, make_datasets,
                        make_tokenizer, no_checkpoint, run, torchrun, tree, weights)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("data")))


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
# the random streams of a sequence, written out: blake2b of "seed,n,stream", stream 0 for t and the
# UL2 mask (t first), 1 for the noise, 2 for the self-conditioning coin


def stream_seed(seed, n, stream):
    """The 63-bit generator seed of (run seed, global sample index, stream), restated."""
    digest = hashlib.blake2b(f"{seed},{n},{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draws_written_out(seed, n, seq_len, prefix="released"):
    """Sequence n's t, UL2 mask, noise seed and coin, each from its own stream as the docstring above says."""
    g = torch.Generator().manual_seed(stream_seed(seed, n, 0))
    t = int(torch.randint(5000, (), generator=g))  # uniform over {0, ..., T-1}, first from stream 0
    mask = tess2.ul2_mask(seq_len, g, prefix=prefix)  # then the mask, from the same generator
    coin = bool(torch.rand((), generator=torch.Generator().manual_seed(stream_seed(seed, n, 2))) < 0.5)  # rho = 0.5
    return dict(t=t, mask=mask, noise_seed=stream_seed(seed, n, 1), coin=coin)


SEEDS_AND_INDICES = [(0, 0), (0, 1), (1, 0), (1, 23), (12, 3), (7, 2**40), (2**62, 10**12), (2**63 - 1, 5)]


def test_each_stream_seed_is_the_blake2b_of_seed_index_and_stream_and_the_streams_differ():
    """For several (seed, n), including ones that would collide if the three numbers were run together
    ("1,23" and "12,3") or packed into 64 bits: train.sample_seed is the restated hash, the three streams
    of one sequence have three different seeds, and no two (seed, n, stream) of the list share one."""
    seen = {}
    for seed, n in SEEDS_AND_INDICES:
        streams = [train.sample_seed(seed, n, stream) for stream in (0, 1, 2)]
        assert streams == [stream_seed(seed, n, stream) for stream in (0, 1, 2)], (seed, n)
        assert all(0 <= s < 2**63 for s in streams)
        for stream, s in enumerate(streams):
            assert seen.setdefault(s, (seed, n, stream)) == (seed, n, stream), (seen[s], (seed, n, stream))
    assert len(seen) == 3 * len(SEEDS_AND_INDICES)


def test_make_batch_draws_t_mask_noise_and_coin_each_from_its_own_stream(data):
    """Each sequence's t, UL2 mask, noise seed and coin are draws_written_out(seed, its index), for
    several seeds and indices, and the same again on a second call; the coin comes out both ways."""
    ds = open_dataset(data["tokens"])
    coins = set()
    for seed in (0, 5, 2**40):
        args = train.parse_args(flags("adapt", data, "unused", batch_size=8, seed=seed))
        keys = [0, 1, 2, 7, 1000, 123456]
        b = train.make_batch(args, ds, keys)
        again = train.make_batch(args, ds, keys)
        for k in ("t", "span_mask", "self_condition"):
            assert torch.equal(b[k], again[k]), k
        assert b["noise_seeds"] == again["noise_seeds"]
        for i, n in enumerate(keys):
            want = draws_written_out(seed, n, args.seq_len)
            assert int(b["t"][i]) == want["t"], (seed, n)
            assert torch.equal(b["span_mask"][i], want["mask"]), (seed, n)
            assert b["noise_seeds"][i] == want["noise_seed"], (seed, n)
            assert bool(b["self_condition"][i]) == want["coin"] == train.self_condition_coin(seed, n), (seed, n)
            coins.add(want["coin"])
    assert coins == {True, False}


def test_the_noise_of_a_sequence_is_not_the_draw_of_its_other_streams():
    """The noise generator's first N(0, 1) draws differ from what the t/mask stream's and the coin
    stream's generators would give (streams collapsed into one seed would make them equal)."""
    for seed, n in SEEDS_AND_INDICES:
        first = [torch.randn(8, generator=torch.Generator().manual_seed(train.sample_seed(seed, n, stream)))
                 for stream in (0, 1, 2)]
        assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2]), (seed, n)
        assert not torch.equal(first[0], first[2]), (seed, n)


def test_a_sequences_coin_decides_its_loss_in_the_objective(data):
    """train.Objective on make_batch's batch (sequence weighting, before the division by target_count)
    is the sum over its sequences of loss_by_hand with each one's written-out t, mask, noise and coin:
    coin True the two-pass loss, False the one-pass one. The batch holds both coins."""
    args = train.parse_args(flags("adapt", data, "unused", batch_size=8))
    keys = [0, 1, 2, 3, 4, 5]
    want = [draws_written_out(args.seed, n, args.seq_len) for n in keys]
    assert {w["coin"] for w in want} == {True, False}
    torch.manual_seed(0)
    net = Transformer(preset("tiny", vocab_size=61, **train.STAGES["adapt"]["model"])).init_weights()
    with torch.no_grad():  # a model whose previous prediction moves its input (see loss_by_hand's test)
        net.timestep_embed.weight.normal_()
        net.lm_head.weight.mul_(30.0)
        net.model.embed_tokens.weight.mul_(30.0)
    b = train.make_batch(args, open_dataset(data["tokens"]), keys)
    with torch.no_grad():
        loss = train.Objective(net, "adapt", "sequence")(b)
        by_hand = [loss_by_hand(net, b["ids"][i], w["mask"], w["t"], w["noise_seed"], w["coin"])
                   for i, w in enumerate(want)]
        flipped = [loss_by_hand(net, b["ids"][i], w["mask"], w["t"], w["noise_seed"], not w["coin"])
                   for i, w in enumerate(want)]
    assert_close(loss, sum(by_hand), **TIGHT)
    assert abs(sum(by_hand) - sum(flipped)) > 1e-2  # the coins matter at this tolerance


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
    log = run("adapt", data, tmp_path / "step", lr=1e-2, **kw)
    args = train.parse_args(flags("adapt", data, "unused", **kw))
    net = train.build_model(args, open_dataset(data["tokens"]).meta, "scratch", torch.device("cpu"))[0]  # its start
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
# bad input: a clear error and no checkpoint


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
    assert not (tmp_path / "run").exists()  # the run created --out and left nothing in it: it is removed


@pytest.fixture(scope="module")
def made(data, tmp_path_factory):
    """What the refusals below start from: a tiny checkpoint of each kind with the data's tokenizer
    (61 ids), a run folder of an ar run stopped at step 2 of 3 (step-0000001, step-0000002, log.jsonl,
    .lock), a file, another tokenizer and a dataset made with it."""
    root = tmp_path_factory.mktemp("made")
    kinds = dict(lm={}, diffusion=dict(timestep_embed=True, causal=False), reward=dict(head="score"))
    for name, kw in kinds.items():
        torch.manual_seed(0)
        net = Transformer(preset("tiny", vocab_size=61, **kw)).init_weights()
        net.save_pretrained(str(root / name), tokenizer_from=data["tok"])
    run("ar", data, root / "run", max_steps=3, save_every=1, stop_at=2)
    (root / "a_file").write_text("mine")
    (root / "broken").mkdir()
    (root / "broken" / "meta.json").write_text("{not json")
    make_tokenizer(str(root / "other_tok"), words=40)
    make_data(str(root), "tokens", tok_dir=str(root / "other_tok"))
    return root


def run_copy(made, tmp, name, damage=None):
    """A copy of the made run folder at tmp/name (step-0000002's `damage` file truncated), its .lock
    naming a run that has ended elsewhere (a run that took the lock would write its own pid there)."""
    out = shutil.copytree(made / "run", tmp / name)
    (out / ".lock").write_text("pid 1 on another-host\n")
    if damage:
        path = out / "step-0000002" / damage
        path.write_bytes(path.read_bytes()[:-100])
    return out


STARTS = {"adapt": "a causal LM or a diffusion LM (bidirectional, with a timestep embedding)",
          "sft": "a diffusion LM (bidirectional, with a timestep embedding)",
          "rm": "a causal LM or a reward model (a score head, no LM head)", "ar": "a causal LM"}
IS = dict(lm="a causal LM: adapt it first (--stage adapt --init it) and pass that run's checkpoint",
          diffusion="a diffusion LM (bidirectional, with a timestep embedding): pass the causal LM it was adapted "
          "from, or scratch: made causal and without its timestep embedding, it would be a new, untrained model "
          "under the old one's name",
          reward="a reward model (a score head, no LM head): pass the causal LM it was trained from")


def refusals(data, made, tmp, held):
    """(case, stage, flags, the message after "train.py: error: "; one ending in "..." is its beginning).
    --out is tmp/out unless a case names one; `held` collects the locks a case holds."""
    out, new = {}, str(tmp / "out")
    for name in ("plain", "batch", "later", "data", "held"):
        out[name] = run_copy(made, tmp, name)
    out["unreadable"] = run_copy(made, tmp, "unreadable", damage="model.safetensors")
    held.append(run_folder.lock(str(out["held"])))
    lm, diffusion, reward = (str(made / k) for k in ("lm", "diffusion", "reward"))
    refused = lambda stage, kind, path: (f"--stage {stage} starts from scratch or from {STARTS[stage]}, but "  # noqa
                                         f"{path} is {IS[kind]}")
    cases = [
        # each numeric flag in its declared range
        ("--seq-len 0", "ar", dict(seq_len=0), "--seq-len must be a whole number >= 2, got 0"),
        ("--seq-len 1", "ar", dict(seq_len=1), "--seq-len must be a whole number >= 2, got 1"),
        ("--batch-size 0", "ar", dict(batch_size=0), "--batch-size must be a positive integer, got 0"),
        ("--micro-batch-size 0", "ar", dict(micro_batch_size=0),
         "--micro-batch-size must be a positive integer, got 0"),
        ("--max-steps 0", "ar", dict(max_steps=0), "--max-steps must be a positive integer, got 0"),
        ("--max-steps 1e20", "ar", dict(max_steps="1e20"),
         "--max-steps must be a positive integer below 2**63, got 1e20"),
        ("--stop-at 2.5", "ar", dict(stop_at=2.5), "--stop-at must be a positive integer, got 2.5"),
        ("--save-every 0", "ar", dict(save_every=0), "--save-every must be a positive integer, got 0"),
        ("--save-every 1e20", "ar", dict(save_every="1e20"),
         "--save-every must be a positive integer below 2**63, got 1e20"),
        ("--log-every 0", "ar", dict(log_every=0), "--log-every must be a positive integer, got 0"),
        ("--eval-batches 0", "ar", dict(eval_batches=0), "--eval-batches must be a positive integer, got 0"),
        ("--keep-last -1", "ar", dict(keep_last=-1), "--keep-last must be 0 or a positive integer, got -1"),
        ("--warmup-steps -1", "ar", dict(warmup_steps=-1), "--warmup-steps must be 0 or a positive integer, got -1"),
        ("--eval-every x", "ar", dict(eval_every="x"), "--eval-every must be 0 or a positive integer, got x"),
        ("--epochs 0", "ar", dict(epochs=0, max_steps=None), "--epochs must be a finite number > 0, got 0"),
        ("--lr 0", "ar", dict(lr=0), "--lr must be a finite number > 0, got 0"),
        ("--lr -0.001", "ar", dict(lr="-0.001"), "--lr must be a finite number > 0, got -0.001"),
        ("--lr nan", "ar", dict(lr="nan"), "--lr must be a finite number > 0, got nan"),
        ("--grad-clip -1", "ar", dict(grad_clip=-1), "--grad-clip must be a finite number >= 0, got -1"),
        ("--weight-decay -5", "ar", dict(weight_decay=-5), "--weight-decay must be a finite number >= 0, got -5"),
        ("--adam-betas 0.9 1", "ar", dict(adam_betas=[0.9, 1]), "--adam-betas must be a number in [0, 1), got 1"),
        ("--adam-betas -0.1 0.999", "ar", dict(adam_betas=[-0.1, 0.999]),
         "--adam-betas must be a number in [0, 1), got -0.1"),
        ("--seed -1", "ar", dict(seed=-1), "--seed must be a whole number in [0, 2**63), got -1"),
        ("--seed 2**70", "ar", dict(seed=2**70), f"--seed must be a whole number in [0, 2**63), got {2**70}"),
        ("--lora 0", "ar", dict(lora=0, init=lm, preset=None), "--lora must be a positive integer, got 0"),
        ("--lora-alpha 0", "ar", dict(lora=4, lora_alpha=0, init=lm, preset=None),
         "--lora-alpha must be a finite number > 0, got 0"),
        ("--lora-dropout 1", "ar", dict(lora=4, lora_dropout=1, init=lm, preset=None),
         "--lora-dropout must be a number in [0, 1), got 1"),
        ("--peak-tflops 0", "ar", dict(peak_tflops=0), "--peak-tflops must be a finite number > 0, got 0"),
        ("--schedule steep", "ar", dict(schedule="steep"),
         "argument --schedule: invalid choice: 'steep' (choose from 'constant', 'linear', 'cosine')"),
        # flags against each other and the machine
        ("--lora-alpha without --lora", "ar", dict(lora_alpha=8),
         "--lora-alpha and --lora-dropout set LoRA's adapters: pass --lora R as well"),
        ("--lora from scratch", "ar", dict(lora=4),
         "--lora adapts a pretrained model: pass --init a checkpoint folder or Hub id, not scratch"),
        ("--fsdp without torchrun", "ar", dict(fsdp=True),
         "--fsdp shards the model over processes: launch with torchrun --nproc_per_node N"),
        ("scratch without --preset", "ar", dict(preset=None), "--init scratch needs --preset (e.g. tiny, small)"),
        ("no --init", "ar", dict(init=None, preset=None),
         "--init is required: a Hub id, a checkpoint folder, or 'scratch' with --preset"),
        ("batch not a multiple", "ar", dict(batch_size=3, micro_batch_size=2),
         "--batch-size 3 must be a multiple of processes (1) x --micro-batch-size (2)"),
        # --out
        ("--out unwritable", "ar", dict(out=made / "a_file" / "run"),
         f"cannot write to --out {made}/a_file/run ({made}/a_file is not a folder): choose a folder you can write to"),
        ("--out a file", "ar", dict(out=made / "a_file"), f"--out {made}/a_file is a file: give a folder"),
        ("--out held by another run", "ar", dict(out=out["held"], resume=True),
         f"{out['held']} is in use by another run (pid {os.getpid()} on {socket.gethostname()}): wait for it to "
         "end or stop it, or choose another --out"),
        # --init and --resume
        ("--init missing", "ar", dict(init=tmp / "nowhere", preset=None),
         f"no checkpoint folder {tmp}/nowhere: pass an existing folder, a Hub id, or 'scratch' with --preset"),
        ("--init a run folder", "ar", dict(init=made / "run", preset=None),
         f"{made}/run has no config.json: it is a run folder: pass one of its checkpoints, e.g. "
         f"{made}/run/step-0000002"),
        ("--resume not a step folder", "ar", dict(resume=tmp),
         f"--resume {tmp}: expected no value (--out's latest checkpoint) or a step-XXXXXXX checkpoint folder"),
        ("checkpoints without --resume", "ar", dict(out=out["plain"]),
         f"{out['plain']} already holds checkpoints: pass --resume to continue, or another --out"),
        ("--resume with another --batch-size", "ar", dict(out=out["batch"], resume=True, max_steps=3, batch_size=8),
         f"--resume {out['batch']}/step-0000002: it was trained with --batch-size 4, this run asks for 8: pass "
         "--batch-size 4, or start a new --out"),
        ("--resume before later checkpoints", "ar", dict(out=out["later"], resume=out["later"] / "step-0000001",
                                                        max_steps=3),
         f"--resume {out['later']}/step-0000001: {out['later']} has later checkpoints (step-0000002); continuing "
         "from here would leave them as an abandoned second history. Pass --discard-later to move them aside "
         "(into a discarded-* folder), or resume from the latest"),
        ("--resume an unreadable checkpoint", "ar", dict(out=out["unreadable"], resume=True, max_steps=3),
         f"{out['unreadable']}/step-0000002/model.safetensors is unreadable (..."),
        ("--resume on other data", "ar", dict(out=out["data"], resume=True, max_steps=3, data=data["val"]),
         f"--resume {out['data']}/step-0000002: it was trained on --data {os.path.realpath(data['tokens'])}, "
         "this run's --data differs (..."),
        # the checkpoint a stage starts from (STAGES' init), by its config.json
        ("adapt from a reward model", "adapt", dict(init=reward, preset=None), refused("adapt", "reward", reward)),
        ("sft from a causal LM", "sft", dict(init=lm, preset=None), refused("sft", "lm", lm)),
        ("sft from a reward model", "sft", dict(init=reward, preset=None), refused("sft", "reward", reward)),
        ("rm from a diffusion LM", "rm", dict(init=diffusion, preset=None), refused("rm", "diffusion", diffusion)),
        ("ar from a diffusion LM", "ar", dict(init=diffusion, preset=None), refused("ar", "diffusion", diffusion)),
        ("ar from a reward model", "ar", dict(init=reward, preset=None), refused("ar", "reward", reward)),
        # the data and the tokenizer
        ("--data missing", "ar", dict(data=tmp / "nowhere"), f"no dataset folder at {tmp}/nowhere: run a prepare ..."),
        ("--data malformed", "ar", dict(data=made / "broken"), f"{made}/broken/meta.json is not valid JSON (..."),
        ("--data of another kind", "sft", dict(data=data["tokens"]),
         f"--stage sft trains on spans data, but {data['tokens']} holds 'tokens' data"),
        ("--val-data of another tokenizer", "ar", dict(val_data=made / "tokens-0"),
         f"{made}/tokens-0 was tokenized with {made}/other_tok, the training data with {data['tok']}: prepare both "
         "with the same tokenizer"),
        ("--tokenizer missing", "ar", dict(tokenizer=tmp / "no_tok"),
         f"no tokenizer folder or file '{tmp}/no_tok' (and it is not a Hub repo id like 'hamishivi/tess2')"),
        ("--tokenizer another vocabulary", "ar", dict(tokenizer=made / "other_tok"),
         f"the data was tokenized with {data['tok']} (61 ids) but the tokenizer at {made}/other_tok differs "
         "(44 ids, other tokens): prepare the data again with --tokenizer pointing at the model's tokenizer"),
        ("--seq-len beyond the model", "ar", dict(seq_len=2048),
         "--seq-len 2048 is beyond what the model attends over (1024, max_position_embeddings / sliding_window): "
         "lower --seq-len"),
    ]
    if not torch.cuda.is_available():
        cases.append(("--device cuda without CUDA", "ar", dict(device="cuda"),
                      "--device cuda, but no CUDA device is visible here: pass --device cpu (or auto)"))
    return [(case, stage, {"out": new, **kw}, message) for case, stage, kw, message in cases]


def test_a_refused_run_is_one_line_exit_status_2_and_writes_nothing(data, made, tmp_path, capsys, monkeypatch):
    """Every refusal of train.py, each numeric flag out of its range among them: exit status 2, stderr
    one line `train.py: error: ...` (the message as written here) without a traceback, and --out as it
    was: absent, or byte for byte what it held (hidden .lock included); its lock was never taken (which
    would create it, and write this process's pid)."""
    held, locked = [], []
    try:
        cases = refusals(data, made, tmp_path, held)
        real_lock = run_folder.lock
        monkeypatch.setattr(run_folder, "lock", lambda *args: (locked.append(args), real_lock(*args))[1])
        for case, stage, kw, message in cases:
            before = tree(kw["out"])
            with pytest.raises(SystemExit) as stop:
                run_cli(train.main, "train.py", flags(stage, data, **kw))
            err = capsys.readouterr().err
            assert stop.value.code == 2, case
            assert err.count("\n") == 1 and err.startswith("train.py: error: "), (case, err)
            got = err.removeprefix("train.py: error: ").rstrip("\n")
            assert got.startswith(message[:-3]) if message.endswith("...") else got == message, (case, got)
            assert tree(kw["out"]) == before and locked == [], case
    finally:
        for handle in held:
            handle.close()
    assert len(cases) >= 55


# -----------------------------------------------------------------------------
# what each stage starts from and what its checkpoint says


DIFFUSION, REWARD, CAUSAL = ("MistralForDiffusionLM", True, False), ("MistralForSequenceClassification", False, True), \
    ("MistralForCausalLM", False, True)


@pytest.mark.parametrize("stage, start, saved", [
    ("adapt", "scratch", DIFFUSION), ("adapt", "lm", DIFFUSION), ("adapt", "diffusion", DIFFUSION),
    ("sft", "scratch", DIFFUSION), ("sft", "diffusion", DIFFUSION),
    ("rm", "scratch", REWARD), ("rm", "lm", REWARD), ("rm", "reward", REWARD),
    ("ar", "scratch", CAUSAL), ("ar", "lm", CAUSAL)])
def test_each_stage_starts_from_the_kinds_it_accepts_and_saves_a_config_of_what_it_trained(data, made, tmp_path,
                                                                                          stage, start, saved):
    """Every checkpoint kind a stage accepts (the others are refused above) trains one step, and the
    saved config.json names the architecture trained: diffusion stages a bidirectional model with a
    timestep embedding, rm a causal model with one score, ar a causal LM; from_pretrained reads it so."""
    init = dict(init="scratch") if start == "scratch" else dict(init=made / start, preset=None)
    run(stage, data, tmp_path, max_steps=1, **init)
    cfg = json.loads((tmp_path / "step-0000001" / "config.json").read_text())
    assert (cfg["architectures"][0], cfg["timestep_embed"], cfg["causal"]) == saved
    assert cfg.get("num_labels") == (1 if saved == REWARD else None)
    args = Transformer.from_pretrained(str(tmp_path / "step-0000001"), verbose=False).args
    assert (args.architecture, args.timestep_embed, args.causal) == saved


# -----------------------------------------------------------------------------
# the machine's faults while saving


SAVE_POINTS = [(tempfile, "mkdtemp"), (checkpoint, "write_json"), (safetensors.torch, "save_file"), (torch, "save"),
               (os, "rename")]  # a new checkpoint's folder, its 6 files (4 JSON), its move into place
ADVICE = {errno.ENOSPC: "free space on that disk",
          errno.EROFS: "the file system is mounted read-only: make it writable",
          errno.EACCES: "this user may not write there: fix the folder's permissions"}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_disk_or_a_read_only_or_forbidden_folder_while_saving_is_one_line(data, made, tmp_path, capsys,
                                                                                 monkeypatch, code):
    """The save of step 3 (the made run resumed) fails with OSError(code) at its k-th step, for every k:
    creating its folder, each of its files (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, train_state.json, train_state.pt), moving it into place. Each time: exit
    status 2, one line naming the checkpoint and what to do, no traceback; --out holds what it held,
    byte for byte, but its lock's pid and the log's new record of step 3 (a --resume cuts it), and nothing
    partial; then --resume continues from step 2 to the end."""
    k, message = 0, (f"cannot write checkpoint {tmp_path}/out{{k}}/step-0000003: {os.strerror(code)}; {ADVICE[code]}, "
                     "then run again with --resume (the checkpoints saved before are whole)")
    this_run = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()  # what the run's lock says
    while True:
        k += 1
        out = run_copy(made, tmp_path, f"out{k}")
        before, calls = tree(out), [0]

        def failing(real):
            def wrapper(*args, **kw):
                calls[0] += 1
                if calls[0] == k:
                    raise OSError(code, os.strerror(code), str(args[0]) if args else None)
                return real(*args, **kw)
            return wrapper
        for module, name in SAVE_POINTS:
            monkeypatch.setattr(module, name, failing(getattr(module, name)))
        try:
            run_cli(train.main, "train.py", flags("ar", data, out, resume=True, max_steps=3, save_every=1))
            finished = True
        except SystemExit as stop:
            finished = False
            assert stop.code == 2, k
        finally:
            monkeypatch.undo()
        err = capsys.readouterr().err
        if finished:
            break
        assert err == f"train.py: error: {message.format(k=k)}\n", (k, err)
        after = tree(out)
        assert after["log.jsonl"].startswith(before["log.jsonl"]) and b'"step": 3' in after["log.jsonl"], k
        assert after == {**before, "log.jsonl": after["log.jsonl"], ".lock": this_run}, k
    assert k - 1 == 8  # the folder, 6 files, the move
    log = run("ar", data, tmp_path / "out1", resume=True, max_steps=3, save_every=1)
    assert [r["step"] for r in log["train"]] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "out1")) == [".lock", "log.jsonl", "step-0000001", "step-0000002",
                                                      "step-0000003"]


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
