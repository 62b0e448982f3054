"""support/prompts.py: the generation settings (the checkpoint's, then a caller's or a flag's),
prompts -> rows (the chat template, gaps), on a small word-level tokenizer."""
import argparse
import json

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


def test_the_guidance_step_size_without_eta_is_the_papers():
    assert prompts.GUIDANCE_ETA == 0.25 and Settings().eta is None
