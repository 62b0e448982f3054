"""support/views.py: what --show draws on the terminal and the confidence --html shows, on the
shipped model's tokenizer (and, end to end, the shipped model)."""
import os
import types

import torch

import sample
from support import views
from support.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "models", "tess2-shakespeare")


def test_the_confidence_shown_is_the_top_probability():
    logits = torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(views.confidence(logits), torch.softmax(logits, -1).amax(-1))


def test_show_draws_each_rows_text_after_its_prompt_at_every_step(capsys):
    """Two rows whose prompts end at 3 and 2, each with a text up to an EOS and a row length of its
    own: every step's block holds both texts, nothing after the EOS or the row's length."""
    tok = Tokenizer(SHIPPED)
    first, second = tok.encode("my gracious lord"), tok.encode("good night")
    row0 = [tok.bos_id, 5, 6] + first + [tok.eos_id] + tok.encode("never shown")
    row1 = [tok.bos_id, 7] + second + tok.encode("nor this")
    L = max(len(row0), len(row1))
    best = torch.tensor([row0 + [0] * (L - len(row0)), row1 + [0] * (L - len(row1))])
    batch = types.SimpleNamespace(ends=[3, 2], prompts=["a", "b"])
    state = types.SimpleNamespace(keys=[0, 1], lengths=[len(row0), 2 + len(second)], steps=[3, 3], best=best,
                                  logits=torch.randn(2, L, tok.vocab_size))
    watch = views.Watcher(tok, show=True)
    for n in (1, 2, 3):
        state.taken = [n, n]
        watch(batch, state)
    blocks = capsys.readouterr().err.split("[step ")[1:]
    assert [b.split("/")[0] for b in blocks] == ["1", "2", "3"]
    for block in blocks:
        assert "my gracious lord" in block and "good night" in block
        assert "never shown" not in block and "nor this" not in block


def test_show_on_the_shipped_model_draws_the_text_as_it_forms(capsys):
    """The README's `python sample.py --prompt "Continue this speech by ROMEO:" --show`, in fewer
    steps: the last drawing is the text printed."""
    gens = sample.main(["--prompt", "Continue this speech by ROMEO:", "--show", "--steps", "10", "--seed", "3"])
    out, err = capsys.readouterr()
    text = gens[0].text
    assert text.strip() and out == text + "\n"
    blocks = err.split("[step ")[1:]
    assert len(blocks) == 10 and blocks[-1].split("]\n", 1)[1].strip() == text.strip()
