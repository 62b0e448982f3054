"""data/: the on-disk format, the sampling order and the chat layout of METHOD.md §8 (one turn and many).
The prepare scripts are tested in test_data_tools.py."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, models

from data import shakespeare
from data.chat import (conversation, encode_chat_prompt, encode_chats, encode_example, encode_examples, encode_prompt,
                       first_turn, format_prompt)
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


def test_data_order_is_numpys_permutation_seeded_by_seed_and_epoch():
    """Index i reads example perm[i % n] of perm = default_rng([seed, epoch = i // n]).permutation(n),
    restated here, for several (n, seed); the order repeats, and differs between epochs and seeds."""
    for n, seed in [(1, 0), (7, 0), (17, 1), (17, 2**40), (100, 3)]:
        perm = [np.random.default_rng([seed, epoch]).permutation(n) for epoch in range(3)]
        indices = list(range(3 * n))
        want = [perm[i // n][i % n] for i in indices]
        assert sample_positions(indices, n, seed).tolist() == want, (n, seed)
        assert sample_positions(indices[::-1], n, seed).tolist() == want[::-1]  # each index on its own
        if n > 2:
            assert not np.array_equal(perm[0], perm[1]) and not np.array_equal(perm[1], perm[2]), (n, seed)
            other = np.random.default_rng([seed + 1, 0]).permutation(n)
            assert not np.array_equal(sample_positions(range(n), n, seed + 1), perm[0])
            assert sample_positions(range(n), n, seed + 1).tolist() == other.tolist()


def test_a_batch_of_tokens_spans_or_pairs_is_each_sampled_example_laid_out(tmp_path):
    """batch(indices) of a tokens, a spans and a pairs dataset of items of different lengths: row r is
    example perm[index_r] (data order restated): window k = stream[9k : 9k + 9] of the token stream
    (documents and shards cut anywhere), or the example laid out by span_row / pair_row."""
    docs = [[1, 5, 2], [1] + list(range(10, 30)) + [2], [1, 7, 7, 2], [1] + list(range(40, 54)) + [2]]
    write_tokens(tmp_path / "tokens", docs, fake_meta(1000), shard_tokens=10)
    stream = [t for doc in docs for t in doc]  # 45 tokens: 5 windows of 9
    windows = [stream[9 * k:9 * k + 9] for k in range(5)]
    spans = [([1, 5, 2], 1), ([1, 5, 6, 7, 8, 9, 2], 3), ([1, 5, 6, 2, 5, 7, 8, 2], [False, False, True, True,
             False, False, True, True]), ([1, 9, 9, 9, 2], 4), ([1] + list(range(10, 30)) + [2], 6)]
    write_spans(tmp_path / "spans", spans, fake_meta(1000, pad_id=999))
    pairs = [([1, 5, 2], [1, 5, 6, 7, 2], 2), ([1, 5, 6, 7, 8, 2], [1, 5, 6, 2], 3), ([1, 9, 2], [1, 8, 2], 1),
             ([1] + list(range(10, 25)) + [2], [1, 10, 2], 2)]
    write_pairs(tmp_path / "pairs", pairs, fake_meta(1000, pad_id=999))
    indices = [0, 3, 4, 6, 7, 9]  # across two epochs of each
    for kind, items in (("tokens", windows), ("spans", spans), ("pairs", pairs)):
        n, ds = len(items), open_dataset(tmp_path / kind)
        order = [np.random.default_rng([7, i // n]).permutation(n)[i % n] for i in indices]
        got = ds.batch(indices, 9, seed=7)
        for r, e in enumerate(order):
            if kind == "tokens":
                assert got["ids"][r].tolist() == windows[e], (r, e)
            elif kind == "spans":
                ids, span = items[e]
                mask = span if isinstance(span, list) else [j >= span for j in range(len(ids))]
                assert (got["ids"][r].tolist(), got["span_mask"][r].tolist()) == span_row(ids, mask, 9, 999), (r, e)
            else:
                chosen, rejected, prompt_len = items[e]
                for side, ids in (("chosen", chosen), ("rejected", rejected)):
                    row, last = pair_row(ids, prompt_len, 9, 999)
                    assert (got[side][r].tolist(), int(got[side + "_last"][r])) == (row, last), (r, e, side)


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
    ids, span = [1, 3, 5, 6, 4, 10, 11, 2], [False] * 5 + [True] * 3
    assert span_row(ids, span, 6, 12) == ([1, 3, 5, 6, 4, 10], [False] * 5 + [True])  # response cut
    row, mask = span_row(ids, span, 4, 12)  # prompt fills the row: BOS + its tail, half for the response
    assert row == [1, 4, 10, 11] and mask == [False, False, True, True]


def test_a_multi_turn_row_is_cut_on_the_right_and_padded_as_span():
    #      <s> <|user|> hello <|assistant|> fine </s> <|user|> how <|assistant|> thanks </s>
    ids = [1, 3, 5, 4, 10, 2, 3, 7, 4, 11, 2]
    span = [False, False, False, False, True, True, False, False, False, True, True]
    assert span_row(ids, span, 14, 12) == (ids + [12] * 3, span + [True] * 3)
    assert span_row(ids, span, 8, 12) == (ids[:8], span[:8])  # the second exchange is cut in its context
    row, mask = span_row(ids, span, 4, 12)  # no reply starts in 4 positions: BOS + 1 context token, then the span
    assert row == [1, 4, 10, 2] and mask == [False, False, True, True]


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


# ----------------------------------------------------------------------------- multi-turn chats

@pytest.fixture
def chat_tok(tmp_path):
    """A word-level tokenizer with the system role too; ids are positions in the list."""
    words = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "hello", "world", "how", "are",
             "you", "fine", "thanks", "[PAD]"]
    return Tokenizer(word_tokenizer(tmp_path / "chat_tok", words, split_on_punctuation=False))


def spans_written_out(tok, ids, mask):
    """The tokens of a row, a span token in brackets: "<s> <|user|> hello <|assistant|> [fine] [</s>]"."""
    name = tok.tokenizer.id_to_token
    return " ".join(f"[{name(i)}]" if m else name(i) for i, m in zip(ids, mask))


ONE = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]
TWO = ONE + [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}]
THREE = [{"role": "system", "content": "thanks"}] + TWO + [{"role": "user", "content": "world"},
                                                            {"role": "assistant", "content": " hello world\n"}]


def test_every_assistant_turn_is_a_span_and_every_system_or_user_turn_context(chat_tok):
    (one, mask1), (two, mask2), (three, mask3) = encode_chats(chat_tok, [ONE, TWO, THREE])
    assert spans_written_out(chat_tok, one, mask1) == "<s> <|user|> hello <|assistant|> [fine] [</s>]"
    assert spans_written_out(chat_tok, two, mask2) == ("<s> <|user|> hello <|assistant|> [fine] [</s>] "
                                                       "<|user|> how are you <|assistant|> [fine] [thanks] [</s>]")
    assert spans_written_out(chat_tok, three, mask3) == (
        "<s> <|system|> thanks <|user|> hello <|assistant|> [fine] [</s>] <|user|> how are you <|assistant|> "
        "[fine] [thanks] [</s>] <|user|> world <|assistant|> [hello] [world] [</s>]")
    assert three == [1, 3, 12, 4, 6, 5, 11, 2, 4, 8, 9, 10, 5, 11, 12, 2, 4, 7, 5, 6, 7, 2]
    # the positions that are span, as numbers
    assert [i for i, m in enumerate(mask3) if m] == [6, 7, 13, 14, 15, 19, 20, 21]


def test_messages_after_the_last_reply_are_left_out(chat_tok):
    [(ids, mask)] = encode_chats(chat_tok, [TWO + [{"role": "user", "content": "hello"}]])
    assert (ids, mask) == tuple(encode_chats(chat_tok, [TWO])[0])


def test_a_multi_turn_chat_is_the_template_written_out_as_one_string(bpe_dir):
    """ids = open-instruct's layout as one string through the raw tokenizer (<s> and </s> are its special
    tokens): every reply's EOS followed by a newline, the last one not; the spans decode to the replies."""
    tok = Tokenizer(bpe_dir)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4, I think."}, {"role": "user", "content": "Hello world?"},
            {"role": "assistant", "content": "Fine, thanks! And you?"}]
    template = ("<s><|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n4, I think.</s>\n"
                "<|user|>\nHello world?\n<|assistant|>\nFine, thanks! And you?</s>")
    [(ids, mask)] = encode_chats(tok, [chat])
    assert ids == tok.tokenizer.encode(template, add_special_tokens=False).ids
    starts = [i for i in range(len(mask)) if mask[i] and not mask[i - 1]]
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert [tok.decode(ids[s:e]) for s, e in zip(starts, ends)] == ["4, I think.", "Fine, thanks! And you?"]
    assert [ids[e] for e in ends] == [tok.eos_id, tok.eos_id]


def test_a_single_turn_chat_is_the_single_turn_example(bpe_dir):
    tok = Tokenizer(bpe_dir)
    pairs = [(a, b) for a in SENTENCES for b in SENTENCES[:3]] + [("  spaced  ", "\n\nnewlines first"), ("x", "")]
    chats = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in pairs]
    for (ids, prompt_len), (chat_ids, mask) in zip(encode_examples(tok, pairs), encode_chats(tok, chats)):
        assert chat_ids == ids and mask == [False] * prompt_len + [True] * (len(ids) - prompt_len)


def test_a_generation_prompt_is_the_chat_so_far_and_the_assistant_header(chat_tok, bpe_dir):
    assert encode_chat_prompt(chat_tok, TWO[:3]) == [1, 4, 6, 5, 11, 2, 4, 8, 9, 10, 5]
    # what the model saw in training before the reply it is to generate
    [(ids, mask)] = encode_chats(chat_tok, [TWO])
    assert encode_chat_prompt(chat_tok, TWO[:3]) == ids[:mask.index(True, 6)]
    tok = Tokenizer(bpe_dir)
    for text in SENTENCES + ["  spaced \n"]:  # one user message: encode_prompt exactly (sample.py's rows)
        assert encode_chat_prompt(tok, [{"role": "user", "content": text}]) == encode_prompt(tok, text)


@pytest.mark.parametrize("messages, phrase", [
    (TWO, "the last message is the assistant's: a prompt ends with a user message"),
    ([], "a chat is a non-empty list"),
    ([{"role": "bot", "content": "hi"}], 'message 1 needs a "role" among system, user, assistant'),
    ([{"role": "user", "content": 3}], 'message 1 needs a "content" string'),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}],
     "a chat starts with a user message"),
])
def test_a_malformed_chat_is_refused_saying_what_is_wrong(chat_tok, messages, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase)):
        encode_chat_prompt(chat_tok, messages)


def test_a_record_without_a_chat_says_why():
    assert conversation({"user": "q", "assistant": "a"}) == [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match=r'no "messages" list and no "user" and "assistant" strings \(its fields: text'):
        conversation({"text": "x"})
    with pytest.raises(ValueError, match="no assistant message"):
        conversation({"messages": [{"role": "user", "content": "q"}]})
    with pytest.raises(ValueError, match="starts with a user message"):
        conversation({"messages": [{"role": "assistant", "content": "a"}]})


# ----------------------------------------------------------------------------- every packed item reads back

def test_each_kind_reads_back_item_by_item_what_was_written(tmp_path):
    """Several items of different lengths, written and read back one by one: no item runs into the next."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 999, n).tolist() + [2] for n in (0, 1, 7, 30, 2)]
    meta = write_tokens(tmp_path / "tokens", docs, fake_meta(1000), shard_tokens=11)
    ds, start = open_dataset(tmp_path / "tokens"), 0
    for doc in docs:
        assert ds.read(start, start + len(doc)).tolist() == doc
        start += len(doc)
    assert start == meta["num_tokens"]

    spans = [([1, 5, 2], 1), ([1, 5, 6, 7, 8, 9, 2], 3),
             ([1, 5, 6, 2, 5, 7, 8, 2], [False, False, True, True, False, False, True, True]), ([1, 9, 9, 9, 2], 4)]
    write_spans(tmp_path / "spans", spans, fake_meta(1000))
    ds = open_dataset(tmp_path / "spans")
    assert ds.num_examples() == 4
    for i, (ids, span) in enumerate(spans):
        mask = span if isinstance(span, list) else [j >= span for j in range(len(ids))]
        got_ids, got_mask = ds.example(i)
        assert got_ids.tolist() == ids and got_mask.tolist() == mask

    pairs = [([1, 5, 2], [1, 5, 6, 7, 2], 2), ([1, 5, 6, 7, 8, 2], [1, 5, 6, 2], 3), ([1, 9, 2], [1, 8, 2], 1)]
    write_pairs(tmp_path / "pairs", pairs, fake_meta(1000))
    ds = open_dataset(tmp_path / "pairs")
    for i, (chosen, rejected, prompt_len) in enumerate(pairs):
        got = ds.pair(i)
        assert (got[0].tolist(), got[1].tolist(), got[2]) == (chosen, rejected, prompt_len)


def test_a_spans_dataset_written_before_span_masks_reads_one_span_from_its_prompt_len(tmp_path):
    write_spans(tmp_path / "sft", [([1, 5, 6, 2], 2), ([1, 5, 6, 7, 8, 2], 4)], fake_meta(1000))
    meta = json.loads((tmp_path / "sft" / "meta.json").read_text())
    del meta["files"]["span_mask.bin"]
    (tmp_path / "sft" / "span_mask.bin").unlink()
    (tmp_path / "sft" / "meta.json").write_text(json.dumps(meta))
    ds = open_dataset(tmp_path / "sft")
    assert ds.example(0)[1].tolist() == [False] * 2 + [True] * 2
    assert ds.example(1)[1].tolist() == [False] * 4 + [True] * 2


@pytest.mark.parametrize("span, phrase", [(0, "prompt_len 0 must be in"), (4, "prompt_len 4 must be in"),
                                          ([True] * 4, "BOS as context"), ([False] * 4, "at least one span token"),
                                          ([False, True], "one flag per token")])
def test_write_spans_refuses_an_example_without_a_span(tmp_path, span, phrase):
    with pytest.raises(ValueError, match=phrase):
        write_spans(tmp_path / "sft", [([1, 5, 6, 2], span)], fake_meta(1000))


def test_a_writer_refuses_a_span_mask_that_makes_bos_a_span_or_has_no_span():
    """data.shards.span_flags: one flag per token, BOS (position 0) context, at least one span token;
    a mask that breaks one of these is refused by name, not written."""
    from data.shards import span_flags
    ids = [1, 5, 6, 7, 2]
    assert span_flags(0, ids, [False, False, True, True, True]).tolist() == [False, False, True, True, True]
    assert span_flags(0, ids, [False, True, False, False, False]).tolist() == [False, True, False, False, False]
    for bad in ([True, False, True, True, True], [False] * 5, [False, True, True], [False] * 4 + [True] * 2):
        with pytest.raises(ValueError, match="example 3: its span mask needs one flag per token"):
            span_flags(3, ids, bad)


def test_pair_rows_need_two_positions_and_an_empty_dataset_samples_nothing():
    assert pair_row([1, 5, 2], 2, 2, 0) == ([1, 2], 1)  # BOS + the final EOS: the smallest row
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        pair_row([1, 5, 2], 2, 1, 0)
    assert pair_row([1, 5, 6, 2], 2, 4, 0) == ([1, 5, 6, 2], 3)  # exactly seq_len: nothing cut
    with pytest.raises(ValueError, match="no examples at this sequence length"):
        sample_positions([0], 0, seed=0)
    assert sample_positions([0, 1, 2], 1, seed=0).tolist() == [0, 0, 0]  # one example: every index reads it


def test_a_token_stream_of_exactly_one_window_gives_that_window_and_a_shorter_one_is_refused(tmp_path):
    write_tokens(tmp_path / "ds", [np.arange(12)], fake_meta(1000))
    ds = open_dataset(tmp_path / "ds")
    assert ds.batch([0, 1], 12, seed=0)["ids"].tolist() == [list(range(12))] * 2  # one window, read twice
    with pytest.raises(ValueError, match="fewer than one window of 13"):
        ds.batch([0], 13, seed=0)
