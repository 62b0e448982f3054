"""
Finding checkpoints and tokenizers, locally or on the Hugging Face Hub, and reading their JSON files.
"""
import json
import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def is_hub_id(name: str) -> bool:
    """Whether name can be a Hub repo id ('owner/name') rather than a local path."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1 and not os.path.exists(name)


def hub_error(repo: str, e: Exception) -> FileNotFoundError:
    """One line for a failed Hub fetch (the library's own error runs to a hundred lines)."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return FileNotFoundError(f"{repo!r} is not a local directory and could not be fetched from the Hugging Face "
                             f"Hub ({type(e).__name__}: {first}); offline, pass a local checkpoint directory")


def resolve(name_or_path: str) -> str:
    """A local checkpoint directory, or a Hub repo id fetched (config, safetensors, tokenizer only)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path} is a file; pass the checkpoint directory that holds config.json")
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"no checkpoint directory {name_or_path!r} (and it is not a Hub repo id like "
                                "'hamishivi/tess2')")
    from huggingface_hub import snapshot_download
    try:  # offline (HF_HUB_OFFLINE=1 or no network) this returns the cached snapshot, if any
        return snapshot_download(name_or_path, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
            *TOKENIZER_FILES])
    except Exception as e:
        raise hub_error(name_or_path, e) from None


def read_json(path: str, what: str = "file"):
    """json.load with the file named in the error (a truncated config.json, say)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the {what} may be truncated or edited by hand; "
                         "restore it from its source") from None


def read_config(path: str) -> dict:
    """config.json of a checkpoint directory; a training run folder is named as such."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        runs = sorted(d for d in os.listdir(path) if d.startswith("step-")) if os.path.isdir(path) else []
        hint = f"; it looks like a training run folder: pass one of its checkpoints, e.g. {os.path.join(path, runs[-1])}" if runs else ""
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory{hint}")
    return read_json(file, "checkpoint's config.json")
