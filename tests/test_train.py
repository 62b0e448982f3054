"""
train.py: every stage trains, and a step is the same step however it is computed.

A step's loss is normalised over the whole global batch and every random draw is keyed by the
global sample index (or the step), so gradient accumulation, 2 DDP processes, 2 FSDP2 processes
and a stopped-then-resumed run all reproduce one plain run; each sequence's draws (t and its UL2
mask, noise, self-conditioning coin) come from three streams restated here from their hash, and
the coin decides its loss. Models are model.preset("tiny"), datasets a few hundred random tokens
written with data.shards (tests/train_runs.py), everything on CPU in fp32.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import tess2
import train
from data.shards import open_dataset
from model import Transformer, preset
from support.cli import run_cli
from test_fused_loss import loss_by_hand
from train_runs import (ROOT, TIGHT, WEIGHTS, assert_same_weights, flags, losses, make_data, make_datasets,
                        no_checkpoint, run, torchrun, weights)


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
