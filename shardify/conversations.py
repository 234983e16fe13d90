"""The conversation of one row: ``messages: [{role: user|assistant, content}, ...]`` for its sample.

A row's turns come from one of:

- a ``messages`` column (or one mapped to it), whatever its published shape: ``list<str>`` of
  alternating turns (pixmo-cap-qa), ``list<struct<role, content>>`` (chat format),
  ``list<struct<from, value>>`` (LLaVA: ``human``/``gpt``), ``struct<question: list, answer: list>``
  (parallel lists, pixmo-docs' ``questions``) or ``list<struct<question, answer>>``;
- ``question`` and ``answer`` columns: one turn, or parallel ``list<str>`` columns;
- a built-in template over PixMo's pointing and counting columns (``--template``).

LLaVA's ``<image>`` marker is removed from the text: the trainer places the image's tokens itself,
once, before the conversation. A row whose turns cannot be read is skipped with ``missing_text``
(a null or empty turn) or ``bad_conversation`` (turns that do not alternate, lists of unequal
length, an unknown role).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

TEMPLATES = ("pixmo-points", "pixmo-count")
"""``--template`` names: questions and answers made from PixMo's pointing and counting columns."""
TEMPLATE_FIELDS = {"pixmo-points": ("label", "points"), "pixmo-count": ("label", "count")}
CONVERSATION_FIELDS = ("messages", "label", "points", "count")
"""Fields of the conversation schema beyond question/answer (``--column`` can map each)."""

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_IMAGE_MARKER = re.compile(r"[ \t]*\n?<image>\n?[ \t]*")


class ConversationError(ValueError):
    """A row's turns cannot be read: its skip ``reason`` and a ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TurnSource:
    """How one input's rows give their turns: a ``kind`` and the fields it reads."""

    kind: str
    """``turns``, ``chat``, ``llava``, ``parallel``, ``pairs`` (a messages column), ``qa`` (one
    question and answer), ``qa_lists`` (parallel question/answer columns) or a template name."""
    fields: tuple[str, ...]


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _text_list(kind: pa.DataType) -> bool:
    return _is_list(kind) and _is_text(kind.value_type)


def _struct_names(kind: pa.DataType) -> set[str]:
    return {kind.field(i).name for i in range(kind.num_fields)} if pa.types.is_struct(kind) else set()


def _pair_names(names: set[str]) -> tuple[str, str] | None:
    question = next((n for n in ("question", "questions") if n in names), None)
    answer = next((n for n in ("answer", "answers") if n in names), None)
    return (question, answer) if question and answer else None


def messages_kind(kind: pa.DataType) -> str | None:
    """Which shape a messages column has, from its Arrow type; None for one this cannot read."""
    if _text_list(kind):
        return "turns"
    if _is_list(kind) and pa.types.is_struct(kind.value_type):
        names = _struct_names(kind.value_type)
        if {"role", "content"} <= names:
            return "chat"
        if {"from", "value"} <= names:
            return "llava"
        if _pair_names(names):
            return "pairs"
    if pa.types.is_struct(kind):
        pair = _pair_names(_struct_names(kind))
        if pair and all(_text_list(kind.field(name).type) for name in pair):
            return "parallel"
    return None


MESSAGES_SHAPES = (
    "list<string> (alternating user/assistant turns), list<struct<role, content>>, "
    "list<struct<from, value>> (LLaVA), struct<question: list<string>, answer: list<string>> "
    "or list<struct<question, answer>>"
)


def row_turns(
    source: TurnSource, values: dict[str, Any], width: int = 0, height: int = 0
) -> list[dict[str, str]]:
    """The row's turns, alternating user and assistant; ConversationError when they cannot be read.

    ``values`` holds the row's value of each of ``source.fields``; ``width`` and ``height`` are its
    image's (templates scale points by them).
    """
    if source.kind in TEMPLATES:
        return _TEMPLATE_BUILDERS[source.kind](values, width, height)
    if source.kind == "qa":
        return _pairs([(values["question"], values["answer"])])
    if source.kind == "qa_lists":
        return _pairs(_zipped(values["question"], values["answer"], "question", "answer"))
    value = values["messages"]
    if value is None:
        raise ConversationError("missing_text", "messages is null")
    if source.kind == "turns":
        if len(value) % 2:
            raise ConversationError(
                "bad_conversation", f"messages holds {len(value)} turns, not user/assistant pairs"
            )
        return _checked([("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(value)])
    if source.kind in ("chat", "llava"):
        role_key, text_key = ("role", "content") if source.kind == "chat" else ("from", "value")
        turns = []
        for i, message in enumerate(value):
            role = _ROLES.get(str((message or {}).get(role_key)).lower())
            if role is None:
                raise ConversationError(
                    "bad_conversation", f"messages[{i}] has role {(message or {}).get(role_key)!r}"
                )
            turns.append((role, message.get(text_key)))
        return _checked(turns)
    if source.kind == "parallel":
        question, answer = _pair_names(set(value))  # type: ignore[misc]
        return _pairs(_zipped(value[question], value[answer], question, answer))
    if source.kind == "pairs":
        pairs = []
        for item in value:
            question, answer = _pair_names(set(item or {})) or ("question", "answer")
            pairs.append(((item or {}).get(question), (item or {}).get(answer)))
        return _pairs(pairs)
    raise ValueError(f"unknown turn source {source.kind!r}")


def _zipped(questions: Any, answers: Any, question_name: str, answer_name: str) -> list[tuple[Any, Any]]:
    if questions is None or answers is None:
        raise ConversationError(
            "missing_text", f"{question_name if questions is None else answer_name} is null"
        )
    if len(questions) != len(answers):
        raise ConversationError(
            "bad_conversation", f"{len(questions)} {question_name} but {len(answers)} {answer_name}"
        )
    return list(zip(questions, answers, strict=True))


def _pairs(pairs: list[tuple[Any, Any]]) -> list[dict[str, str]]:
    return _checked([turn for q, a in pairs for turn in (("user", q), ("assistant", a))])


def _checked(turns: list[tuple[str, Any]]) -> list[dict[str, str]]:
    if not turns:
        raise ConversationError("missing_text", "the conversation has no turns")
    messages = []
    for i, (role, content) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError("bad_conversation", f"turn {i} is {role} where {expected} was due")
        if not isinstance(content, str):
            raise ConversationError(
                "missing_text", f"turn {i} ({role}) is {'null' if content is None else 'not text'}"
            )
        if role == "user":
            content = _IMAGE_MARKER.sub(" ", content).strip()
        if not content.strip():
            raise ConversationError("missing_text", f"turn {i} ({role}) is empty")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ConversationError("bad_conversation", "the conversation ends with a question")
    return messages


def points_text(points: list[tuple[float, float]], width: int, height: int, label: str) -> str:
    """Points in pixels as Molmo writes them: coordinates in 0-100 of the width and height, one
    decimal, sorted by x then y; ``<point .../>`` for one, ``<points x1= y1= ...>`` for several."""
    if not points:
        return "There are none."
    scaled = sorted((round(x * 100 / width, 1), round(y * 100 / height, 1)) for x, y in points)
    if len(scaled) == 1:
        ((x, y),) = scaled
        return f'<point x="{x:.1f}" y="{y:.1f}" alt="{label}">{label}</point>'
    coordinates = " ".join(f'x{i}="{x:.1f}" y{i}="{y:.1f}"' for i, (x, y) in enumerate(scaled, start=1))
    return f'<points {coordinates} alt="{label}">{label}</points>'


def _label(values: dict[str, Any]) -> str:
    label = values.get("label")
    if not isinstance(label, str) or not label.strip():
        raise ConversationError("missing_text", "label is null or empty")
    return label.strip().lower()


def _pointing(values: dict[str, Any], width: int, height: int) -> list[dict[str, str]]:
    label, raw = _label(values), values.get("points")
    if raw is None:
        raise ConversationError("missing_text", "points is null")
    if isinstance(raw, dict):  # struct of lists, as pixmo-count stores them
        points = list(zip(raw.get("x") or [], raw.get("y") or [], strict=False))
    else:
        points = [((p or {}).get("x"), (p or {}).get("y")) for p in raw]
    if any(x is None or y is None for x, y in points):
        raise ConversationError("missing_text", "a point has no x or y")
    if not width or not height:
        raise ConversationError("bad_conversation", "points need the image's size")
    answer = points_text([(float(x), float(y)) for x, y in points], width, height, label)
    return _checked([("user", f"Point to {label}"), ("assistant", answer)])


def _counting(values: dict[str, Any], width: int, height: int) -> list[dict[str, str]]:
    label, count = _label(values), values.get("count")
    if count is None:
        raise ConversationError("missing_text", "count is null")
    return _checked([("user", f"How many {label} are there?"), ("assistant", str(int(count)))])


_TEMPLATE_BUILDERS: dict[str, Callable[[dict[str, Any], int, int], list[dict[str, str]]]] = {
    "pixmo-points": _pointing,
    "pixmo-count": _counting,
}
