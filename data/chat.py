"""The Tulu chat template (METHOD.md §8): how a chat becomes ids.

    <s><|user|>\n{user}\n<|assistant|>\n{assistant}</s>

A chat of several turns, with a system message, is laid out as open-instruct lays out Tulu's data
(a newline after each reply's EOS but the last):

    <s><|system|>\n{system}\n<|user|>\n{user 1}\n<|assistant|>\n{reply 1}</s>\n
    <|user|>\n{user 2}\n<|assistant|>\n{reply 2}</s>          (one string: broken here to fit)

Every assistant reply with its EOS is a span (what the model learns to generate); BOS and every
system or user turn, role markers included, are context. The role markers are plain text. The
tokenizer (tokenizer.Tokenizer) never adds special tokens; BOS and EOS ids are added here, so every
tokenizer (Mistral's, a small BPE) is treated alike.
"""
import itertools

ROLES = ("system", "user", "assistant")


def format_prompt(user):
    """The context part of a single-turn example, up to and including "<|assistant|>\\n"."""
    return f"<|user|>\n{user}\n<|assistant|>\n"


def encode_prompt(tok, user):
    """BOS + the templated prompt, user text stripped as in training: the context a sampler starts from."""
    return [tok.bos_id] + tok.encode(format_prompt(user.strip()))


def encode_pairs(tok, pairs):
    """[(context, reply)] texts -> [(ids, n)]: context + reply tokenized as one text (no BOS or EOS),
    ids[:n] the context's own tokens. The whole text is tokenized at once, so the reply tokenizes as
    in running text. When a token starts exactly at the reply's first character, the tokens before
    it are the context's own tokens (BPE merges never split, so none crossed that boundary). If a
    token straddles it, context and reply are tokenized apart instead."""
    encodings = tok.tokenizer.encode_batch([c + r for c, r in pairs], add_special_tokens=False)
    out = []
    for (context, reply), enc in zip(pairs, encodings):
        ids, n = enc.ids, enc.char_to_token(len(context)) if reply else len(enc.ids)
        if n is None or (reply and enc.token_to_chars(n)[0] != len(context)):
            context_ids = tok.encode(context)
            ids, n = context_ids + tok.encode(reply), len(context_ids)
        out.append((ids, n))
    return out


def encode_examples(tok, examples):
    """[(user, assistant)] -> [(ids, prompt_len)] with ids = BOS + prompt + response + EOS and
    ids[:prompt_len] the context (encode_pairs). Both texts are stripped (as open-instruct does)."""
    pairs = [(format_prompt(user.strip()), assistant.strip()) for user, assistant in examples]
    return [([tok.bos_id] + ids + [tok.eos_id], 1 + n) for ids, n in encode_pairs(tok, pairs)]


def exchanges(messages):
    """A chat's messages -> ([(context, reply)] for each assistant message, the context after the last
    reply). A context is the text since the previous reply's EOS: the newline after that EOS, each
    system or user message as "<|role|>\n{content}\n", then "<|assistant|>\n". Contents are stripped."""
    pairs, context = [], ""
    for message in messages:
        content = message["content"].strip()
        if message["role"] == "assistant":
            pairs.append((context + "<|assistant|>\n", content))
            context = "\n"
        else:
            context += f"<|{message['role']}|>\n{content}\n"
    return pairs, context


def encode_chats(tok, chats):
    """Chats (lists of {"role", "content"} messages, checked by check_messages) -> [(ids, span_mask)]:
    ids = BOS + each exchange's context and reply + EOS after every reply; span_mask is True on every
    reply and its EOS. Messages after the last reply are left out (there is nothing to learn in them).
    A single exchange gives exactly encode_examples' ids, with the span from its prompt_len on."""
    split = [exchanges(chat)[0] for chat in chats]
    encoded = iter(encode_pairs(tok, [pair for pairs in split for pair in pairs]))
    out = []
    for pairs in split:
        ids, mask = [tok.bos_id], [False]
        for pair_ids, n in itertools.islice(encoded, len(pairs)):
            ids += pair_ids + [tok.eos_id]
            mask += [False] * n + [True] * (len(pair_ids) - n + 1)
        out.append((ids, mask))
    return out


def encode_chat_prompt(tok, messages):
    """BOS + a chat for generation: its messages as in training (encode_chats), then the assistant header
    "<|assistant|>\n", the context a sampler generates the next reply from. The last message is the
    user's. [{"role": "user", "content": text}] gives exactly encode_prompt(tok, text)."""
    check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message is the {messages[-1]['role']}'s: a prompt ends with a user message, "
                         "whose reply is generated")
    pairs, tail = exchanges(messages)
    ids = [tok.bos_id]
    for pair_ids, _ in encode_pairs(tok, pairs):
        ids += pair_ids + [tok.eos_id]
    return ids + tok.encode(tail + "<|assistant|>\n")


def check_messages(messages):
    """Refuses (ValueError, naming what is wrong) anything but a list of {"role", "content"} messages
    with roles system, user or assistant, string contents, and a user message before any reply."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a chat is a non-empty list of {\"role\", \"content\"} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message {i + 1} needs a \"role\" among {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i + 1} needs a \"content\" string")
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first != "user":
        raise ValueError("a chat starts with a user message (after any system message)")


def conversation(record):
    """The messages of one record to tune on: Tulu's {"messages": [...]} or {"user": ..., "assistant": ...},
    cut after the last assistant reply. Raises ValueError saying why a record has none."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "messages" not in record:
        if isinstance(record.get("user"), str) and isinstance(record.get("assistant"), str):
            return [{"role": "user", "content": record["user"]}, {"role": "assistant", "content": record["assistant"]}]
        raise ValueError(f"no \"messages\" list and no \"user\" and \"assistant\" strings (its fields: "
                         f"{', '.join(map(str, record)) or 'none'})")
    messages = record["messages"]
    check_messages(messages)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant message")
    return messages[:last + 1]


def encode_example(tok, user, assistant):
    return encode_examples(tok, [(user, assistant)])[0]


def first_turn(record):
    """(user, assistant) of the first exchange of a record, or None: the released code's single-turn
    reading (data.tulu --first-turn-only; the reward model's pairs). Reads the Tulu format
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]} (a leading
    system message is skipped) and plain {"user", "assistant"}."""
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
