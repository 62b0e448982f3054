"""
The tokenizer: a `tokenizers` tokenizer.json with its special ids, from a folder, a file or the Hub.
"""
import hashlib
import json
import os

from support.hub import hub_error, is_hub_id, read_json


def tokenizer_paths(name_or_path: str, revision: str | None = None) -> tuple[str, str | None]:
    """(tokenizer.json, tokenizer_config.json or None) of a folder, a tokenizer.json file, or a Hub
    model id (of which only these two files are fetched, not the weights)."""
    if os.path.isfile(name_or_path):
        return name_or_path, os.path.join(os.path.dirname(name_or_path), "tokenizer_config.json")
    if os.path.isdir(name_or_path):
        file = os.path.join(name_or_path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"{name_or_path} has no tokenizer.json (a `tokenizers` file); a tokenizer.model "
                                    "alone can be converted once with transformers' AutoTokenizer.save_pretrained")
        return file, os.path.join(name_or_path, "tokenizer_config.json")
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"no tokenizer folder or file {name_or_path!r} (and it is not a Hub repo id like "
                                "'hamishivi/tess2')")
    repo = name_or_path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        file = hf_hub_download(repo, "tokenizer.json", revision=revision)
    except Exception as e:
        raise hub_error(repo, e) from None
    try:
        return file, hf_hub_download(repo, "tokenizer_config.json", revision=revision)
    except EntryNotFoundError:  # a repo may have tokenizer.json alone
        return file, None


class Tokenizer:
    """
    A `tokenizers` tokenizer with its special ids, read by tokenizer_paths(). BOS/EOS/PAD are the
    tokens tokenizer_config.json names (default <s>, </s>, [PAD]); a vocabulary without its pad token
    gets it as the next id, as TESS does for Mistral (32000 ids + [PAD] = 32001). Text is encoded
    without special tokens: callers add BOS/EOS where the format says.
    """

    def __init__(self, name_or_path, revision: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer
        self.name = str(name_or_path)  # as given: recorded in each dataset's meta.json
        file, config_file = tokenizer_paths(self.name, revision)
        with open(file, "rb") as f:
            raw = f.read()
        config = read_json(config_file, "tokenizer config") if config_file and os.path.exists(config_file) else {}
        self.tokenizer = tok = HFTokenizer.from_str(raw.decode("utf-8"))

        def special_id(key, default):
            token = config.get(key)
            token = (token.get("content") if isinstance(token, dict) else token) or default  # {"content": "<s>", ...}
            if key == "pad_token" and tok.token_to_id(token) is None:
                tok.add_special_tokens([token])
                self.pad_added = True
            if tok.token_to_id(token) is None:
                raise ValueError(f"{file}: {key} {token!r} is not in the vocabulary; fix tokenizer_config.json")
            return tok.token_to_id(token)

        self.pad_added = False  # True when [PAD] is our addition (a model may not have that row)
        self.bos_id, self.eos_id = special_id("bos_token", "<s>"), special_id("eos_token", "</s>")
        self.pad_id = special_id("pad_token", "[PAD]")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)  # [PAD] included
        self.sha256 = hashlib.sha256(raw).hexdigest()  # of the file as read (provenance)
        # of the id -> token table in use, [PAD] included: what data and model must agree on
        vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        self.vocab_sha256 = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list[list[int]]:
        """Several texts at once, in parallel threads."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def meta(self) -> dict:
        """The tokenizer fields every dataset's meta.json carries (data/shards.py)."""
        return dict(vocab_size=self.vocab_size, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
                    tokenizer=self.name, tokenizer_sha256=self.sha256, vocab_sha256=self.vocab_sha256)

    def fingerprint(self) -> dict:
        """What two models must agree on to share text: the id -> token table and the special ids."""
        return {k: v for k, v in self.meta().items() if k not in ("tokenizer", "tokenizer_sha256")}
