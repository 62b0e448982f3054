"""How text becomes ids: the tokenizer and the Tulu chat template (SPEC 8).

    <s><|user|>\n{user}\n<|assistant|>\n{assistant}</s>

The role markers are plain text. The tokenizer is always called with add_special_tokens=False
and BOS/EOS ids are added here, so every tokenizer (Mistral's, a small BPE) is treated alike.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

PAD_TOKEN = "[PAD]"  # TESS adds it to Mistral's 32000 tokens (id 32000, V = 32001)


def format_prompt(user):
    """The context part of a single-turn example, up to and including "<|assistant|>\\n"."""
    return f"<|user|>\n{user}\n<|assistant|>\n"


@dataclass
class TokenizerInfo:
    tokenizer: Tokenizer
    name: str           # the folder, file or Hub id it was loaded from
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int     # including added tokens such as [PAD]
    sha256: str         # of the tokenizer.json file as read (provenance)
    vocab_sha256: str   # of the id -> token table in use, [PAD] included (what must match the model)

    def meta(self):
        """The tokenizer fields every dataset's meta.json carries."""
        return {"vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "tokenizer": self.name, "tokenizer_sha256": self.sha256,
                "vocab_sha256": self.vocab_sha256}

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """Several texts at once, in parallel threads."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _token_name(value, default):
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if value else default


def _fetch_tokenizer_files(repo_id, revision=None):
    """tokenizer.json (and tokenizer_config.json if the repo has one) of a Hub model."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        json_path = hf_hub_download(repo_id, "tokenizer.json", revision=revision)
    except Exception as e:
        raise FileNotFoundError(f"{repo_id!r} is not a local folder or file, and getting its tokenizer.json from the "
                                f"Hub failed ({type(e).__name__}: {e}). Pass --tokenizer a folder that holds "
                                "tokenizer.json, or a Hub model id with network access.") from None
    try:
        config_path = hf_hub_download(repo_id, "tokenizer_config.json", revision=revision)
    except EntryNotFoundError:
        config_path = None
    return Path(json_path), Path(config_path) if config_path else None


def load_tokenizer(name_or_path, revision=None):
    """A tokenizers.Tokenizer with its special ids, from a folder holding tokenizer.json (and
    optionally tokenizer_config.json), a tokenizer.json file, or a Hub model id.
    BOS/EOS/PAD come from tokenizer_config.json (default "<s>", "</s>", "[PAD]"); if the vocabulary
    has no pad token, "[PAD]" is added as the next id, as TESS does for Mistral."""
    path = Path(name_or_path)
    if path.is_dir():
        json_path, config_path = path / "tokenizer.json", path / "tokenizer_config.json"
        if not json_path.exists():
            raise FileNotFoundError(f"{path} has no tokenizer.json: point --tokenizer at a folder that has one, "
                                    "or at a Hub model id")
    elif path.is_file():
        json_path, config_path = path, path.with_name("tokenizer_config.json")
    else:
        json_path, config_path = _fetch_tokenizer_files(str(name_or_path), revision)
    raw = json_path.read_bytes()
    config = json.loads(config_path.read_text()) if config_path and config_path.exists() else {}
    tok = Tokenizer.from_str(raw.decode("utf-8"))

    def special_id(key, default):
        token = _token_name(config.get(key), default)
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{json_path}: {key} {token!r} is not in the vocabulary; fix tokenizer_config.json")
        return token_id

    pad_name = _token_name(config.get("pad_token"), PAD_TOKEN)
    if tok.token_to_id(pad_name) is None:
        tok.add_special_tokens([pad_name])
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return TokenizerInfo(
        tokenizer=tok, name=str(name_or_path),
        bos_id=special_id("bos_token", "<s>"), eos_id=special_id("eos_token", "</s>"),
        pad_id=tok.token_to_id(pad_name), vocab_size=tok.get_vocab_size(with_added_tokens=True),
        sha256=hashlib.sha256(raw).hexdigest(),
        vocab_sha256=hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest())


def encode_prompt(tok, user):
    """BOS + the templated prompt, user text stripped as in training: the context a sampler starts from."""
    return [tok.bos_id] + tok.encode(format_prompt(user.strip()))


def encode_examples(tok, examples):
    """[(user, assistant)] -> [(ids, prompt_len)] with ids = BOS + prompt + response + EOS and
    ids[:prompt_len] the context. Both texts are stripped (as open-instruct does).
    The whole text is tokenized at once, so the response tokenizes as in running text. When a token
    starts exactly at the response's first character, the tokens before it are the prompt's own
    tokens (BPE merges never split, so none crossed that boundary). If a token straddles it, prompt
    and response are tokenized apart instead."""
    prompts = [format_prompt(user.strip()) for user, _ in examples]
    responses = [assistant.strip() for _, assistant in examples]
    encodings = tok.tokenizer.encode_batch([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)
    out = []
    for prompt, response, enc in zip(prompts, responses, encodings):
        ids, n = enc.ids, enc.char_to_token(len(prompt)) if response else len(enc.ids)
        if n is None or (response and enc.token_to_chars(n)[0] != len(prompt)):
            prompt_ids = tok.encode(prompt)
            ids, n = prompt_ids + tok.encode(response), len(prompt_ids)
        out.append(([tok.bos_id] + ids + [tok.eos_id], 1 + n))
    return out


def encode_example(tok, user, assistant):
    return encode_examples(tok, [(user, assistant)])[0]


def first_turn(record):
    """(user, assistant) of the first exchange of a record, or None. Reads the Tulu format
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]} (a leading
    system message is skipped; SPEC 8 keeps single-turn only) and plain {"user", "assistant"}."""
    if "messages" in record:
        turns = [m for m in record["messages"] if m.get("role") != "system"]
        if len(turns) >= 2 and turns[0].get("role") == "user" and turns[1].get("role") == "assistant":
            return turns[0]["content"], turns[1]["content"]
        return None
    if "user" in record and "assistant" in record:
        return record["user"], record["assistant"]
    return None
