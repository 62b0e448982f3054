"""support/prompts.py: the generation settings (the checkpoint's, then a caller's or a flag's),
prompts -> rows (the chat template, gaps), on a small word-level tokenizer."""
import argparse
import json
import os
import re

import pytest

import data.chat
from conftest import word_tokenizer
from support import prompts
from support.prompts import Settings, encode_prompt, given, make_batch, read_prompts, settings_for
from support.tokenizer import Tokenizer

VOCAB = ["<s>", "</s>", "[PAD]", "<unk>", "<|", "|>", "user", "assistant"] + "the a cat sat on mat write sonnet".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(word_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB,
                                    config={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]"}))


def test_chat_prompts_are_stripped_and_templated_as_in_training(tok):
    ids, span = encode_prompt(tok, "  write a sonnet \n")
    assert ids == encode_prompt(tok, "write a sonnet")[0] == data.chat.encode_prompt(tok, "write a sonnet")
    assert ids == [tok.bos_id] + tok.encode("<|user|>\nwrite a sonnet\n<|assistant|>\n") and not any(span)
    assert encode_prompt(tok, " the cat", chat=False)[0] == [tok.bos_id] + tok.encode(" the cat")


CONFIG = {"steps": 3, "top_p": 0.9, "total_length": 20, "guidance_steps": 2, "chat": False}


def test_settings_are_the_checkpoints_then_the_callers():
    s = settings_for(CONFIG, 1024)
    assert (s.steps, s.top_p, s.total_length, s.guidance_steps, s.chat, s.seed) == (3, 0.9, 20, 2, False, 0)
    s = settings_for(CONFIG, 1024, steps=7, seed=4)
    assert (s.steps, s.seed, s.top_p, s.total_length, s.chat) == (7, 4, 0.9, 20, False)  # only what was given
    assert settings_for(None, 4096) == Settings()  # no generation_config.json: the released evaluation's
    assert settings_for(None, 1024).total_length == 1024  # no longer than the model reads


def test_an_override_of_none_leaves_the_checkpoints_value_except_top_p():
    s = settings_for(CONFIG, 1024, steps=None, length=None, total_length=None, chat=None, eta=None)
    assert s == settings_for(CONFIG, 1024)
    assert settings_for(CONFIG, 1024, top_p=None).top_p is None  # argmax
    s = settings_for(CONFIG, 1024, length=5, total_length=None)  # --length alone: rows of prompt + 5
    assert (s.length, s.total_length) == (5, None)
    with pytest.raises(TypeError, match="unknown generation settings"):
        settings_for(CONFIG, 1024, stepz=3)
    with pytest.raises(ValueError, match="--steps must be"):
        settings_for(CONFIG, 1024, steps=0)


def test_given_reads_the_settings_a_command_line_set():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--argmax", action="store_true")
    p.add_argument("--no-chat", dest="chat", action="store_const", const=False)
    p.add_argument("--device")
    assert given(p.parse_args([])) == {}
    assert given(p.parse_args(["--steps", "4", "--no-chat", "--device", "cpu"])) == {"steps": 4, "chat": False}
    assert given(p.parse_args(["--argmax"])) == {"top_p": None}
    assert given(p.parse_args(["--top-p", "0.5"])) == {"top_p": 0.5}


def test_rows_are_prompt_plus_length_or_the_total_length(tok):
    b = make_batch(tok, ["the cat", "write a sonnet on the mat"], Settings(total_length=None, length=3, chat=False),
                   1024, tok.pad_id)
    assert b.lengths == [3 + 3, 7 + 3] and b.ends == [3, 7] and b.ids.shape == (2, 10)
    assert b.span_mask.sum(1).tolist() == [3, 3]
    b = make_batch(tok, ["the cat"], Settings(total_length=12, chat=False), 1024, tok.pad_id)
    assert b.lengths == [12] and b.span_mask[0].tolist() == [False] * 3 + [True] * 9


def test_a_prompts_file_is_lines_or_json_lines(tmp_path):
    (tmp_path / "p.txt").write_text("the cat\n\n{\"not\": \"json here\"}\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["the cat", "{\"not\": \"json here\"}"]
    (tmp_path / "p.jsonl").write_text(json.dumps("a\nb") + "\n" + json.dumps({"prompt": "c"}) + "\n")
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a\nb", "c"]
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(str(tmp_path / "none.txt"))


def test_a_bad_value_of_the_checkpoints_file_is_blamed_on_it_and_an_override_on_its_flag():
    where = "m/generation_config.json"
    for config, words in (({"steps": 0}, "steps must be a whole number of at least 1, got 0"),
                          ({"shed": 0}, "shed must be a whole number of at least 1, got 0"),
                          ({"seed": -1}, "seed must be a whole number in [0, 2**63), got -1"),
                          ({"eta": "x"}, "eta must be a finite number >= 0, got 'x'"),
                          ({"sampler": "euler"}, "sampler must be one of stochastic, ddim, got 'euler'"),
                          ({"compile": 1}, "compile must be true or false, got 1")):
        with pytest.raises(ValueError, match=f"^{re.escape(where)}: {re.escape(words)}"):
            settings_for(config, 1024, where, **{k: None for k in config})  # None: no override
        field = next(iter(config))
        with pytest.raises(ValueError, match=f"^--{field}"):  # the flag, not the file
            settings_for({}, 1024, where, **config)
    assert settings_for({"steps": 0, "sampler": "x"}, 1024, where, steps=3, sampler="ddim").steps == 3  # overridden
    with pytest.raises(ValueError, match=f"^{re.escape(where)} must hold a JSON object, got list"):
        settings_for([1], 1024, where)
    s = settings_for({"sampler": "ddim", "shed": 4}, 1024)
    assert (s.sampler, s.shed) == ("ddim", 4) and (Settings().sampler, Settings().shed) == ("stochastic", None)


# Chats: BOS 0, EOS 1; "<|user|>" is <|, user, |> (4, 6, 5), "<|assistant|>" (4, 7, 5); "system" is <unk> 3
U, A, S = [4, 6, 5], [4, 7, 5], [4, 3, 5]


def test_a_chat_of_several_turns_is_laid_out_as_in_training(tok):
    """Every turn in the template, every reply followed by EOS, then the assistant header: the row's context."""
    one = [{"role": "user", "content": " the cat \n"}]
    assert encode_prompt(tok, one) == ([0, *U, 8, 10, *A], [False] * 9)
    assert encode_prompt(tok, one)[0] == encode_prompt(tok, "the cat")[0]  # one turn: exactly a text prompt's row
    two = one + [{"role": "assistant", "content": "a mat"}, {"role": "user", "content": "write a sonnet"}]
    assert encode_prompt(tok, two)[0] == [0, *U, 8, 10, *A, 9, 13, 1, *U, 14, 9, 15, *A]
    three = [{"role": "system", "content": "sat on"}] + two + [{"role": "assistant", "content": "the sonnet"},
                                                              {"role": "user", "content": "a cat"}]
    ids, span = encode_prompt(tok, three, chat=False)  # a chat is a chat: templated whatever `chat` says
    assert ids == [0, *S, 11, 12, *U, 8, 10, *A, 9, 13, 1, *U, 14, 9, 15, *A, 8, 15, 1, *U, 9, 10, *A]
    assert not any(span)
    b = make_batch(tok, [two, "the cat"], Settings(total_length=None, length=2), 1024, tok.pad_id)
    assert b.ends == [21, 9] and b.lengths == [23, 11] and b.span_mask.sum(1).tolist() == [2, 2]


def test_a_chat_prompt_is_checked_and_shown_in_its_turns(tok):
    for bad, words in (([{"role": "assistant", "content": "a"}], "a chat starts with a user message"),
                       ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                        "the last message is the assistant's"),
                       ([{"role": "user", "content": "the <mask:2>"}], "cannot hold <mask:N> gaps"),
                       ([{"role": "user"}], "message 1 needs a \"content\" string")):
        with pytest.raises(ValueError, match=re.escape(words)):
            encode_prompt(tok, bad)
    chat = [{"role": "user", "content": " the cat "}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "b"}]
    assert prompts.prompt_text(chat) == "<|user|>\nthe cat\n<|assistant|>\na\n<|user|>\nb\n"
    assert prompts.prompt_text("the cat") == "the cat"


def test_a_jsonl_prompts_file_may_hold_chats(tmp_path):
    chat = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "b"}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps("c") + "\n")
    assert read_prompts(str(tmp_path / "p.jsonl")) == [chat, "c"]
    (tmp_path / "bad.jsonl").write_text(json.dumps("c") + "\n" + json.dumps({"messages": chat[:2]}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad.jsonl'}, line 2: the last message is the "
                                                   "assistant's")):
        read_prompts(str(tmp_path / "bad.jsonl"))


def test_the_guidance_step_size_without_eta_is_the_papers():
    assert prompts.GUIDANCE_ETA == 0.25 and Settings().eta is None


# -----------------------------------------------------------------------------
# Infilling on the shipped model's byte-level BPE: the prompt is kept exactly as written around each gap

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "tess2-shakespeare")
GAPPED = ["To be, or <mask:3> be", "O Romeo, Romeo!\n<mask:4>\nwherefore art thou", "Now is the <mask:2>",
          "<mask:2> the king.", "a  <mask:1>  b", "(<mask:2>), she said;", "line one\n\n<mask:2>\n\nline three",
          "café <mask:1> au lait", "th<mask:1>e end", "<mask:1><mask:2>!"]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer(SHIPPED)


@pytest.mark.parametrize("prompt", GAPPED)
def test_the_text_around_each_gap_decodes_as_written(bpe, prompt):
    """Each gap filled with a known token (X, N times): the row, decoded as sample.py decodes it, is the
    prompt with each <mask:N> replaced by N X's, every space, newline and punctuation mark in place."""
    ids, span = encode_prompt(bpe, prompt, chat=False, placeholder=bpe.pad_id)
    x = bpe.encode("X")
    assert len(x) == 1 and ids[0] == bpe.bos_id and span.count(True) == sum(map(int, re.findall(r"<mask:(\d+)>",
                                                                                                   prompt)))
    row = [x[0] if is_gap else i for i, is_gap in zip(ids, span)]
    g = prompts.decode_row(bpe, prompt, row, span, len(row))
    assert g.text == re.sub(r"<mask:(\d+)>", lambda m: "X" * int(m.group(1)), prompt)
    assert g.tokens == x * span.count(True)


def test_a_space_before_and_after_a_gap_stays_in_the_context(bpe):
    """'To be, or <mask:3> be': the context keeps the space after "or" (its own token) and the one
    before "be" (in " be", as the BPE writes a word after a space), not the prompt without them."""
    ids, span = encode_prompt(bpe, "To be, or <mask:3> be", chat=False)
    assert ids == [bpe.bos_id] + bpe.encode("To be, or ") + [0, 0, 0] + bpe.encode(" be")
    assert bpe.encode(" be") == [bpe.tokenizer.token_to_id("Ġbe")]  # a leading space is part of the word's token
    assert span == [False] * (len(ids) - 4) + [True] * 3 + [False]


def test_pieces_that_would_merge_across_a_gap_are_encoded_apart(bpe):
    """"the" is one token: th<mask:1>e cannot cut it, so "th" and "e end" are encoded on their own."""
    assert len(bpe.encode("the")) == 1
    assert prompts.encode_pieces(bpe, ["th", "e end"]) == [bpe.encode("th"), bpe.encode("e end")]
    assert prompts.encode_pieces(bpe, ["To be, or ", " be"]) == [bpe.encode("To be, or "), bpe.encode(" be")]
    assert prompts.encode_pieces(bpe, ["", "x", ""]) == [[], bpe.encode("x"), []]


def test_infilling_on_the_shipped_model_fills_only_the_gaps(bpe):
    import sample
    from model import Transformer
    model = Transformer.from_pretrained(SHIPPED, verbose=False).eval()
    g = sample.generate(model, bpe, ["To be, or <mask:3> be"], steps=4, seed=1, details=True)[0]
    assert len(g.tokens) == 3 and g.text == "To be, or " + bpe.decode(g.tokens) + " be"


def test_prompts_without_gaps_are_encoded_as_before(bpe):
    for prompt in ("  To be, or not to be \n", "O Romeo,\nRomeo!"):
        assert encode_prompt(bpe, prompt)[0] == data.chat.encode_prompt(bpe, prompt)
        assert encode_prompt(bpe, prompt, chat=False)[0] == [bpe.bos_id] + bpe.encode(prompt)


@pytest.mark.parametrize("prompt, cause", [
    ("the <mask:³> cat", "'³' is not a number written in the digits 0-9"),
    ("the <mask:٣> cat", "'٣' is not a number written in the digits 0-9"),
    ("the <mask:> cat", "'' is not a number written in the digits 0-9"),
    ("the <mask:2.5> cat", "'2.5' is not a number written in the digits 0-9"),
    ("the <mask:three> cat", "'three' is not a number written in the digits 0-9"),
    ("the <mask:-1> cat", "a gap cannot have a negative size"),
    ("the <mask: 3> cat", "no spaces inside the brackets"),
    ("the <mask:0> cat", "a gap of 0 tokens leaves nothing to fill"),
    ("the <mask:99999999999999999999> cat", "a gap of 99999999999999999999 tokens is longer than the 1024 positions"),
])
def test_a_bad_gap_is_refused_by_its_cause(bpe, prompt, cause):
    spec = re.search(r"<mask:([^>]*)>", prompt).group(1)
    with pytest.raises(ValueError) as e:
        make_batch(bpe, [prompt], Settings(chat=False), 1024, bpe.pad_id)
    assert str(e.value).startswith(f"<mask:{spec}> in prompt {prompt!r}: {cause}")


def test_an_empty_prompts_file_is_named(tmp_path):
    for text in ("", "\n  \n"):
        (tmp_path / "p.txt").write_text(text)
        with pytest.raises(ValueError, match=f"--prompts-file {tmp_path / 'p.txt'} holds no prompt"):
            read_prompts(str(tmp_path / "p.txt"))


@pytest.mark.parametrize("text, tokens, note", [
    ("a line", [5], None),
    ("", [], "the model ended it at once (its first token is the end of text)"),
    ("\n\n\n", [9, 9, 9], "the model produced only newlines: 3 tokens, '\\n\\n\\n'"),
    (" \n \t", [8, 9], "the model produced only whitespace: 2 tokens, ' \\n \\t'"),
    ("", [1, 1], "the model produced 2 special tokens, which decode to no text"),
])
def test_an_empty_answer_says_what_the_model_produced(text, tokens, note):
    assert prompts.empty_answer(prompts.Generation("p", text, tokens)) == note


def test_one_process_runs_every_job_in_order(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert prompts.processes() == (0, 1) and prompts.process_device("cuda") == "cuda"
    assert list(prompts.spread([3, 1, 2], lambda j: j * 10)) == [(3, 30), (1, 10), (2, 20)]


@pytest.mark.parametrize("field, value, words", [
    ("top_p", 0.0, "--top-p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "--top-p must be in (0, 1], got 1.5"),
    ("steps", True, "--steps must be a whole number of at least 1, got True"),  # a bool is no count
    ("steps", 0, "--steps must be a whole number of at least 1, got 0"),
    ("length", -1, "--length must be a whole number of at least 0, got -1"),
    ("seed", 2**63, "--seed must be a whole number in [0, 2**63), got 9223372036854775808"),
    ("eta", float("nan"), "--eta must be a finite number >= 0, got nan"),
])
def test_settings_refuse_each_impossible_value_by_its_flag(field, value, words):
    with pytest.raises(ValueError) as e:
        Settings(**{field: value}).check()
    assert str(e.value).startswith(words)
    assert Settings(top_p=1.0, steps=1, length=0, seed=2**63 - 1, eta=0.0).check()  # the edges themselves pass


def test_one_length_given_drops_the_checkpoints_other_length():
    """Rows are either total_length long or prompt + length: an override of one drops the checkpoint's other."""
    config = {"total_length": 160, "length": None}
    assert (settings_for(config, 1024, length=40).total_length, settings_for(config, 1024, length=40).length) == (None, 40)
    config = {"total_length": None, "length": 40}
    s = settings_for(config, 1024, total_length=100)
    assert (s.total_length, s.length) == (100, None)
    s = settings_for(config, 1024)  # nothing given: the checkpoint's own
    assert (s.total_length, s.length) == (None, 40)
