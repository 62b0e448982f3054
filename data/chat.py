"""The Tulu chat template (METHOD.md §8): how a chat becomes ids.

    <s><|user|>\n{user}\n<|assistant|>\n{assistant}</s>

The role markers are plain text. The tokenizer (tokenizer.Tokenizer) never adds special tokens; BOS
and EOS ids are added here, so every tokenizer (Mistral's, a small BPE) is treated alike.
"""


def format_prompt(user):
    """The context part of a single-turn example, up to and including "<|assistant|>\\n"."""
    return f"<|user|>\n{user}\n<|assistant|>\n"


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
    system message is skipped; METHOD.md §8 keeps single-turn only) and plain {"user", "assistant"}."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return None  # malformed: skipped and counted like any other unusable record
        turns = [m for m in messages if m.get("role") != "system"]
        if len(turns) >= 2 and turns[0].get("role") == "user" and turns[1].get("role") == "assistant":
            pair = turns[0].get("content"), turns[1].get("content")
            return pair if all(isinstance(x, str) for x in pair) else None
        return None
    if isinstance(record.get("user"), str) and isinstance(record.get("assistant"), str):
        return record["user"], record["assistant"]
    return None
