"""
support/run_folder.py: one trainer at a time on a run folder, nothing left behind by an
interruption (a kill at any moment, SIGTERM, a dead torchrun launcher), --resume from the right
checkpoint with one coherent log, checkpoints in Hugging Face layout, and the model a run starts
from (a grown [PAD] row, FSDP2 ranks reading only their shards). Runs are tests/train_runs.py's.
"""
import copy
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.testing import assert_close

import train
from data.shards import open_dataset
from model import Transformer, preset
from support import lora, run_folder
from support.cli import OutputFolder
from support.run_folder import append_log, cut_log
from support.tokenizer import Tokenizer as ModelTokenizer
from train_runs import (ROOT, assert_same_weights, flags, losses, make_datasets, make_tokenizer, no_checkpoint,
                        read_log, read_text, run, weights)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("data")))


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


# -----------------------------------------------------------------------------
# the model a run starts from


def test_an_ar_model_grows_a_pad_row_for_adaptation(data, tmp_path, monkeypatch):
    """Mistral has 32000 ids, the data 32001 ([PAD]): the new row starts as the mean of the others (the
    weights the run starts its first step from)."""
    torch.manual_seed(0)
    ar = Transformer(preset("tiny", vocab_size=60)).init_weights()
    ar.save_pretrained(str(tmp_path / "ar"), tokenizer_from=data["tok"])  # no [PAD] in it
    real, w = train.train, {}

    def spy(args, run):  # the run's weights before its first step
        w.update(copy.deepcopy(run.net.state_dict()))
        real(args, run)
    monkeypatch.setattr(train, "train", spy)
    run("adapt", data, tmp_path / "run", init=str(tmp_path / "ar"), preset=None, max_steps=1)
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


# -----------------------------------------------------------------------------
# one trainer at a time, nothing left behind, recovery


def test_a_second_trainer_on_the_same_out_stops_at_once_and_a_dead_ones_lock_is_free(data, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from support import run_folder; held = run_folder.lock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(120)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid} on .+\)"):
            run("ar", data, tmp_path, max_steps=1)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the OS releases the lock
        holder.wait()
    assert len(run("ar", data, tmp_path, max_steps=1)["train"]) == 1


def test_the_lock_serves_every_tool_and_names_its_flag(tmp_path):
    """run_folder.lock guards the output folder of every tool (support.cli.OutputFolder: --output of
    eval.sweep, --out of the data scripts): its messages say "another run" and name the tool's flag;
    check_out finds the same refusals without writing anything."""
    out, host = tmp_path / "out", socket.gethostname()
    held = run_folder.lock(str(out), "--output")
    try:
        busy = (f"{out} is in use by another run (pid {os.getpid()} on {host}): wait for it to end or stop it, "
                "or choose another --output")
        before = (out / ".lock").read_bytes()
        for attempt in (lambda: run_folder.lock(str(out), "--output"),
                        lambda: run_folder.check_out(str(out), "--output"),
                        lambda: OutputFolder(out, "--output").__enter__()):
            with pytest.raises(ValueError) as caught:
                attempt()
            assert str(caught.value) == busy
        assert (out / ".lock").read_bytes() == before and os.listdir(out) == [".lock"]
        with pytest.raises(ValueError, match=r"choose another --out$"):  # the default flag
            run_folder.lock(str(out))
    finally:
        held.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as caught:
        run_folder.lock(str(tmp_path / "file" / "out"), "--output")
    assert str(caught.value) == (f"cannot write to --output {tmp_path}/file/out (Not a directory): choose a folder you "
                                 "can write to")
    with pytest.raises(OSError) as caught:
        run_folder.check_out(str(tmp_path / "file" / "out" / "deeper"), "--output")
    assert str(caught.value) == (f"cannot write to --output {tmp_path}/file/out/deeper ({tmp_path}/file is not a "
                                 "folder): choose a folder you can write to")
    assert sorted(os.listdir(tmp_path)) == ["file", "out"]


def test_a_run_folder_changed_between_the_checks_and_the_lock_is_refused(data, tmp_path, monkeypatch):
    """The checkpoint a run resumes from is chosen before --out is locked (so that a refusal writes
    nothing) and chosen again under the lock: a checkpoint that appeared in between (another run) stops
    the run before it moves or writes anything but its lock."""
    run("ar", data, tmp_path, max_steps=3, save_every=1, stop_at=1)
    real = train.prepare

    def prepare_then_another_run_saves(*args):
        prepared = real(*args)
        shutil.copytree(tmp_path / "step-0000001", tmp_path / "step-0000002")
        return prepared
    monkeypatch.setattr(train, "prepare", prepare_then_another_run_saves)
    log = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(ValueError, match=f"^{tmp_path} changed while this run was being prepared .another run wrote "
                                         "to it.: start this run again$"):
        run("ar", data, tmp_path, max_steps=3, save_every=1, resume=True)
    assert sorted(os.listdir(tmp_path)) == [".lock", "log.jsonl", "step-0000001", "step-0000002"]
    assert (tmp_path / "log.jsonl").read_text() == log


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
# what the run folder holds, read back item by item


def test_log_jsonl_cut_back_to_a_step_keeps_each_record_as_written(tmp_path, capsys):
    """append_log writes records of different lengths (train and val records, one with a long field) one
    JSON line each, only on rank 0; cut_log(step) keeps exactly the lines of records up to that step, in
    order, byte for byte, for every step; a torn last line is dropped."""
    records = [dict(step=1, loss=2.5, lr=1e-3, grad_norm=0.5, tokens_per_s=100.0, mem_gb=0.125),
               dict(step=2, loss=2.25, lr=2e-3, grad_norm=0.25, tokens_per_s=101.5, mem_gb=0.125),
               dict(step=2, val_loss=3.0625), dict(step=3, loss=1.0, note="x" * 300), dict(step=4, loss=0.5),
               dict(step=4, val_loss=1.5)]
    for r in records:
        append_log(str(tmp_path), r, 0)
        append_log(str(tmp_path), dict(step=99, loss=0.0), 1)  # another rank writes nothing
    path = tmp_path / "log.jsonl"
    written = path.read_text()
    assert written.splitlines() == [json.dumps(r) for r in records]
    assert [json.loads(line) for line in written.splitlines()] == records
    for step in range(6):
        path.write_text(written + '{"step": 5, "lo' * (step == 5))  # step 5: with a torn last line
        cut_log(str(path), step)
        kept = [r for r in records if r["step"] <= step]
        assert path.read_text() == "".join(json.dumps(r) + "\n" for r in kept), step
        assert [json.loads(line) for line in path.read_text().splitlines()] == kept
    assert "dropped a torn last line" in capsys.readouterr().out


def test_a_log_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch):
    """append_log on a full disk or a read-only file system: one line naming log.jsonl and what to do."""
    def full(path, mode="r", **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_folder, "open", full, raising=False)
    with pytest.raises(OSError) as caught:
        append_log(str(tmp_path), dict(step=1, loss=2.0), 0)
    assert str(caught.value) == (f"cannot write the log {tmp_path}/log.jsonl: No space left on device; free space on "
                                 "that disk, then run again with --resume (the checkpoints saved before are whole)")


def test_train_state_and_weights_read_back_as_the_run_had_them(data, tmp_path, monkeypatch):
    """Each checkpoint of an sft run: train_state.json is the step, the data position, the dataset's
    identity and the run's flags written out here; from_pretrained gives the weights the run had at
    that step, and AdamW's state read back with run_folder.load_optimizer is the run's, item by item."""
    live = {}
    save = run_folder.save_checkpoint

    def spy(args, step, objective, net, opt, files, rank):  # the run's own state when it saves
        live[step] = (copy.deepcopy(opt.state_dict()), {k: v.clone() for k, v in net.state_dict().items()})
        return save(args, step, objective, net, opt, files, rank)
    monkeypatch.setattr(run_folder, "save_checkpoint", spy)
    run("sft", data, tmp_path, max_steps=2, save_every=1)
    meta = open_dataset(data["spans"]).meta
    args = train.parse_args(flags("sft", data, tmp_path, max_steps=2, save_every=1))
    assert sorted(live) == [1, 2]
    for step, (opt_state, net_state) in live.items():
        folder = tmp_path / f"step-{step:07d}"
        info = json.loads((folder / "train_state.json").read_text())
        assert info["step"] == step and info["stage"] == "sft"
        assert info["data"] == {"samples_seen": 4 * step, "epoch": 4 * step / 24}
        assert info["dataset"] == {"path": os.path.realpath(data["spans"]), "kind": "spans",
                                   "vocab_sha256": meta["vocab_sha256"], "num_tokens": meta["num_tokens"],
                                   "num_examples": 24}
        assert info["run"] == {"stage": "sft", "seq_len": 24, "batch_size": 4, "max_steps": 2, "lr": 3e-3,
                               "schedule": "linear", "warmup_steps": 1, "weight_decay": 0.0,
                               "adam_betas": [0.9, 0.999], "grad_clip": 1.0, "loss_weighting": "sequence",
                               "ul2_prefix": "released", "overfit": False, "seed": 0, "lora": None, "lora_alpha": None,
                               "lora_dropout": 0.0, "lora_targets": list(lora.TARGETS)}
        assert info["args"] == json.loads(json.dumps(vars(args)))
        state = torch.load(folder / "train_state.pt", weights_only=True)
        assert state["step"] == step and state["args"] == vars(args)
        net = Transformer.from_pretrained(str(folder), verbose=False)
        assert net.state_dict().keys() == net_state.keys()
        for name, value in net.state_dict().items():
            assert torch.equal(value, net_state[name]), (step, name)
        objective, opt = train.wrap(args, net, False, torch.device("cpu"), bf16=False)
        run_folder.load_optimizer(str(folder), objective, opt, 0, False)
        got = opt.state_dict()
        groups = lambda state: [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]  # noqa: E731
        assert groups(got) == groups(opt_state)  # (the betas come back as a list)
        assert got["state"].keys() == opt_state["state"].keys() and len(got["state"]) == len(list(net.parameters()))
        for i, want in opt_state["state"].items():
            assert want.keys() == got["state"][i].keys()
            for key, value in want.items():
                assert torch.equal(got["state"][i][key], value), (step, i, key)


def test_a_log_records_speed_is_tokens_over_seconds_and_mfu_is_model_flops_over_the_peak(monkeypatch):
    """with_speed: tokens/s = batch x length (x 2 pairs for rm) / seconds; on CUDA, MFU = FLOPs per token
    (self-conditioning share 1 - 0.5^(rows that draw a coin)) x tokens / seconds / (peak x processes)."""
    from types import SimpleNamespace
    net = Transformer(preset("tiny", timestep_embed=True, causal=False))
    args = SimpleNamespace(batch_size=4, seq_len=16, stage="adapt", micro_batch_size=2, fsdp=False, peak_tflops=2.0)
    rec = run_folder.with_speed({}, args, net, 1, torch.device("cpu"), 0.5)
    assert rec["tokens_per_s"] == 4 * 16 / 0.5 and rec["mem_gb"] > 0
    rm = run_folder.with_speed({}, SimpleNamespace(**{**vars(args), "stage": "rm"}), net, 1, torch.device("cpu"), 0.5)
    assert rm["tokens_per_s"] == 2 * 4 * 16 / 0.5
    asked = []
    monkeypatch.setattr(run_folder, "flops_per_token", lambda *a, **kw: asked.append((a, kw)) or 1e9)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    for fsdp, world, share in ((False, 2, 1 - 0.5 ** 2), (True, 2, 1 - 0.5 ** 4)):
        rec = run_folder.with_speed({}, SimpleNamespace(**{**vars(args), "fsdp": fsdp}), net, world,
                                    torch.device("cuda"), 0.5)
        assert rec["mem_gb"] == 3.0 and rec["mfu"] == pytest.approx(1e9 * 64 / 0.5 / (2.0 * 1e12 * world))
        assert asked[-1][1] == {"self_condition": share} and asked[-1][0][2:] == (16, "adapt")
