import hashlib

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread: on a shared 2-core machine more threads only spin
    against each other (seen: up to 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def word_tokenizer(folder, vocab, config=None, decoder=False, split_on_punctuation=True):
    """The test suite's tokenizer: a word-level tokenizer.json whose ids are the positions in `vocab`,
    so that tests can write ids down. <unk>, <s>, </s> and [PAD], where present, are special tokens;
    config, if given, is written as tokenizer_config.json; decoder=True joins decoded words with
    spaces through WordPiece's decoder. Returns the folder (a str)."""
    import json
    import os
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if split_on_punctuation else pre_tokenizers.WhitespaceSplit()
    if decoder:
        tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([w for w in ("<unk>", "<s>", "</s>", "[PAD]") if w in vocab])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return str(folder)


def folder_hash(path):
    """What a tool's output holds, to compare before and after a run that must change nothing:
    {relative path: sha256} of everything under a folder (a subfolder as "dir"; the .lock aside: it
    holds the pid of the run that last held the folder), a file's own sha256, or None if absent."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*")) if p.name != ".lock"}
