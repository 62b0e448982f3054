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


def assert_refused(main, prog, argv, flags, out, message, capsys):
    """A tool run with argv and then flags (a flag given in both: flags' value) is refused: exit status
    2, one line `prog: error: ...` holding message, no traceback, and `out` unchanged."""
    from support.cli import run_cli
    before = folder_hash(out)
    for flag in flags[::2]:
        argv = argv[:argv.index(flag)] + argv[argv.index(flag) + 2:] if flag in argv else argv
    with pytest.raises(SystemExit) as stop:
        run_cli(main, prog, argv + flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: ") and message in err, err
    assert folder_hash(out) == before


def randomize_(model):
    """Every weight of a tiny model random (norms near 1, the rest small), so that a weight read into
    the wrong place cannot go unnoticed. -> the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model
