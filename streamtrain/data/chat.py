"""Conversations as token ids and labels, through the decoder's chat template.

This is the one place where a prompt is formatted: training, held-out evaluation and generation
(``add_generation_prompt=True`` for a conversation that ends in a user turn) all call
:func:`encode_chat`, so a question is framed at inference exactly as it was when the model learned.

A conversation is a list of ``{"role": "user" | "assistant", "content": str}`` messages that
alternate, starting with the user (an optional ``system`` message may come first). The template
is rendered around a marker in place of each message's content; the template's own text between
the markers is tokenized with its control tokens (``<|im_start|>``, BOS, ...) parsed as special
tokens, and every content on its own with special-token text kept as plain text, so data can
never inject control tokens. Labels cover each assistant message's content and the token that
ends its turn (the template's first token after the content when it is a special token, as
ChatML's ``<|im_end|>``; otherwise the tokenizer's EOS, inserted) and nothing else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompts, vision tokens, padding); torch's cross-entropy default."""

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
)
"""For tokenizers without a chat template: each user (or system) message then a newline, each
answer then the end-of-sequence token."""

_MARK = "\x00\x01{}\x01\x00"


@dataclass
class ChatTokens:
    """A conversation as the decoder reads it."""

    input_ids: list[int]
    labels: list[int]
    """``IGNORE_INDEX`` everywhere but on each kept assistant turn's content and end token."""
    questions: list[str] = field(default_factory=list)
    """The user messages of the kept turns, in order (shown beside generated answers)."""
    truncated_turns: int = 0
    """Whole (user, assistant) turns dropped from the end to fit ``max_tokens``."""

    @property
    def turns(self) -> int:
        return len(self.questions)


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    max_tokens: int | None = None,
    max_question_tokens: int | None = None,
    max_answer_tokens: int | None = None,
    add_generation_prompt: bool = False,
) -> ChatTokens:
    """Token ids and labels of ``messages`` in ``tokenizer``'s chat template.

    Training (``add_generation_prompt=False``): the conversation ends in an assistant message,
    and the ids end with that answer's end token (what the template puts after it is left out:
    nothing would learn from it). Generation (``add_generation_prompt=True``): it ends in a user
    message, and the ids end with the template's opening of the assistant's turn; no label is set.

    Each user message keeps its first ``max_question_tokens`` ids, each answer its first
    ``max_answer_tokens - 1`` (then its end token). With ``max_tokens``, whole turns are dropped
    from the end until the ids fit; ValueError when even the first turn does not.
    """
    system, turns = _split_turns(messages, add_generation_prompt)
    if max_answer_tokens is not None and max_answer_tokens < 2:
        raise ValueError(
            f"max_answer_tokens must be >= 2 (an answer and its end token), got {max_answer_tokens}"
        )
    contents = [_content_ids(tokenizer, m, max_question_tokens, max_answer_tokens) for m in system + turns]
    kept = len(turns)
    encoded = _render(tokenizer, system + turns, contents, add_generation_prompt)
    if max_tokens is not None and not add_generation_prompt:
        # Dropping the last turn(s) changes what the template renders at the end, so each shorter
        # conversation is rendered again rather than cut.
        while len(encoded[0]) > max_tokens and kept > 2:
            kept -= 2
            encoded = _render(tokenizer, system + turns[:kept], contents[: len(system) + kept], False)
    input_ids, labels = encoded
    if max_tokens is not None and len(input_ids) > max_tokens:
        raise ValueError(
            f"the conversation's first turn takes {len(input_ids)} tokens, more than the {max_tokens} "
            "allowed (data.max_seq_len less the vision tokens)"
        )
    questions = [m["content"] for m in turns[:kept] if m["role"] == "user"]
    return ChatTokens(input_ids, labels, questions, (len(turns) - kept) // 2)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and the template's end of an assistant
    turn (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``), where they differ."""
    ends = [tokenizer.eos_token_id, _turn_end(tokenizer)]
    return list(dict.fromkeys(token for token in ends if token is not None))


def _split_turns(
    messages: list[dict[str, str]], open_ended: bool
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(the optional system message, the alternating turns); ValueError naming what is wrong."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} is not {{role, content}} with text content: {message!r}")
    system = messages[:1] if messages[0].get("role") == "system" else []
    turns = messages[len(system) :]
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(
                f"message {i + len(system)} has role {message.get('role')!r} where {expected!r} was due: "
                "turns alternate user, assistant, ..."
            )
    if not turns:
        raise ValueError("a conversation needs a user message")
    if open_ended and turns[-1]["role"] != "user":
        raise ValueError("a prompt for generation must end with a user message")
    if not open_ended and turns[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with an assistant message")
    return system, turns


def _content_ids(
    tokenizer: Any, message: dict[str, str], max_question: int | None, max_answer: int | None
) -> list[int]:
    ids = _text_ids(tokenizer, message["content"])
    if message["role"] == "assistant":
        return ids[: max_answer - 1] if max_answer is not None else ids
    return ids[:max_question] if max_question is not None and message["role"] == "user" else ids


def _render(
    tokenizer: Any, messages: list[dict[str, str]], contents: list[list[int]], open_ended: bool
) -> tuple[list[int], list[int]]:
    marked = [{"role": m["role"], "content": _MARK.format(i)} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(
        marked,
        chat_template=_template(tokenizer),
        add_generation_prompt=open_ended,
        tokenize=False,
    )
    pieces = []
    for i in range(len(messages)):
        before, found, text = text.partition(_MARK.format(i))
        if not found:
            raise ValueError(
                f"the tokenizer's chat template does not show message {i} ({messages[i]['role']})"
            )
        pieces.append(before)
    pieces.append(text)
    piece_ids = [_template_ids(tokenizer, piece) for piece in pieces]
    turn_end = _turn_end(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    last_label = 0
    for i, message in enumerate(messages):
        _extend(input_ids, labels, piece_ids[i], learned=False)
        _extend(input_ids, labels, contents[i], learned=message["role"] == "assistant")
        if message["role"] == "assistant":
            if piece_ids[i + 1][:1] == [turn_end]:  # the template's own end of the turn: learned
                piece_ids[i + 1] = piece_ids[i + 1][1:]
            _extend(input_ids, labels, [turn_end], learned=True)
            last_label = len(input_ids)
    if open_ended:
        _extend(input_ids, labels, piece_ids[-1], learned=False)
        return input_ids, [IGNORE_INDEX] * len(input_ids)
    return input_ids[:last_label], labels[:last_label]


def _extend(input_ids: list[int], labels: list[int], ids: list[int], learned: bool) -> None:
    input_ids.extend(ids)
    labels.extend(ids if learned else [IGNORE_INDEX] * len(ids))


def _template(tokenizer: Any) -> str:
    return getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE


def _turn_end(tokenizer: Any) -> int:
    """The token that closes an assistant turn: the template's first token after an answer when
    it is a special token (``<|im_end|>``), else the tokenizer's EOS."""
    return _turn_end_cached(tokenizer, _template(tokenizer))


@functools.lru_cache(maxsize=16)
def _turn_end_cached(tokenizer: Any, template: str) -> int:
    probe = [{"role": "user", "content": _MARK.format(0)}, {"role": "assistant", "content": _MARK.format(1)}]
    text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    after = text.partition(_MARK.format(1))[2]
    ids = _template_ids(tokenizer, after)
    special = {token for token, added in tokenizer.added_tokens_decoder.items() if added.special}
    if ids and ids[0] in special:
        return ids[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token to end an answer with")
    return tokenizer.eos_token_id


def _template_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
