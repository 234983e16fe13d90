"""The row schema of a conversion (caption, qa or conversation) and each input's layout, checked."""

from __future__ import annotations

import pyarrow as pa

from shardify.conversations import MESSAGES_SHAPES, TEMPLATE_FIELDS, TurnSource, messages_kind
from shardify.format import SCHEMAS
from shardify.sources import (
    AUDIO_COLUMN,
    IMAGE_COLUMN,
    MEDIA_COLUMNS,
    PATH_COLUMN,
    SHA256_COLUMN,
    TEXT_COLUMNS,
    URL_COLUMN,
    InputError,
    Layout,
    ParquetInput,
    is_binary,
    is_media_struct,
    resolve_layout,
)


def _is_text(field: pa.Field) -> bool:
    return _is_text_kind(field.type)


def _is_text_kind(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _described(layout: Layout, field_name: str) -> str:
    column = layout.column(field_name)
    return field_name if column in (None, field_name) else f"{column} ({field_name})"


def _guess_schema(item: ParquetInput, layout: Layout, template: str | None, group_by: str | None) -> str:
    present = set(layout.fields)
    has_qa = {"question", "answer"} <= present
    has_caption = "caption" in present
    if template or group_by or "messages" in present:
        return "conversation"
    if has_qa and any(_is_list(item.schema.field(layout.fields[f]).type) for f in ("question", "answer")):
        return "conversation"
    if has_qa and has_caption:
        raise InputError(
            f"{item.url} has both caption and question/answer columns: pass --schema caption or qa"
        )
    if not (has_qa or has_caption):
        raise InputError(
            f"{item.url}: cannot tell the schema: need a 'caption' column (caption schema), "
            f"'question' and 'answer' (qa schema) or 'messages' (conversation schema), or --column "
            f"to name them; found: {', '.join(item.schema.names)}"
        )
    return "qa" if has_qa else "caption"


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def turn_source(item: ParquetInput, layout: Layout, template: str | None) -> TurnSource:
    """Where the rows of ``item`` get their turns (conversation schema); InputError naming the column."""
    present = set(layout.fields)

    def kind_of(name: str) -> pa.DataType:
        return item.schema.field(layout.fields[name]).type

    if template:
        missing = [name for name in TEMPLATE_FIELDS[template] if name not in present]
        if missing:
            raise InputError(
                f"{item.url}: --template {template} reads the column(s) "
                f"{', '.join(TEMPLATE_FIELDS[template])}; missing: {', '.join(missing)}; "
                f"found: {', '.join(item.schema.names)}"
            )
        if not _is_text_kind(kind_of("label")):
            raise InputError(
                f"{item.url}: column {_described(layout, 'label')} must be text, found {kind_of('label')}"
            )
        if template == "pixmo-count" and not pa.types.is_integer(kind_of("count")):
            raise InputError(
                f"{item.url}: column {_described(layout, 'count')} must be an integer, "
                f"found {kind_of('count')}"
            )
        if template == "pixmo-points" and not _holds_points(kind_of("points")):
            raise InputError(
                f"{item.url}: column {_described(layout, 'points')} must be list<struct<x, y>> or "
                f"struct<x: list, y: list> (pixels), found {kind_of('points')}"
            )
        return TurnSource(template, TEMPLATE_FIELDS[template])
    if "messages" in present:
        kind = messages_kind(kind_of("messages"))
        if kind is None:
            raise InputError(
                f"{item.url}: column {_described(layout, 'messages')} is {kind_of('messages')}; a messages "
                f"column must be {MESSAGES_SHAPES}"
            )
        return TurnSource(kind, ("messages",))
    if {"question", "answer"} <= present:
        kinds = [kind_of("question"), kind_of("answer")]
        if all(_is_text_kind(k) for k in kinds):
            return TurnSource("qa", ("question", "answer"))
        if all(_is_list(k) and _is_text_kind(k.value_type) for k in kinds):
            return TurnSource("qa_lists", ("question", "answer"))
        raise InputError(
            f"{item.url}: columns {_described(layout, 'question')} and {_described(layout, 'answer')} "
            f"must both be text or both lists of text, found {kinds[0]} and {kinds[1]}"
        )
    raise InputError(
        f"{item.url}: missing required column(s) for the conversation schema: messages (or question "
        f"and answer, or --template {' / '.join(TEMPLATE_FIELDS)} with its columns), or --column "
        f"messages=COLUMN; found: {', '.join(item.schema.names)}"
    )


def _holds_points(kind: pa.DataType) -> bool:
    if _is_list(kind) and pa.types.is_struct(kind.value_type):
        names = {kind.value_type.field(i).name for i in range(kind.value_type.num_fields)}
        return {"x", "y"} <= names
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        return {"x", "y"} <= names and all(_is_list(kind.field(n).type) for n in ("x", "y"))
    return False


def detect_schema(
    inputs: list[ParquetInput],
    requested: str | None,
    columns: dict[str, str] | None = None,
    template: str | None = None,
    group_by: str | None = None,
) -> tuple[str, list[Layout]]:
    """The row schema (caption, qa or conversation), as requested or from the fields, and each
    input's layout."""
    schema = requested
    layouts = []
    for item in inputs:
        layout = resolve_layout(item, columns or {})
        present = set(layout.fields)
        if schema is None:
            schema = _guess_schema(item, layout, template, group_by)
        assert schema in SCHEMAS
        if (template or group_by) and schema != "conversation":
            raise InputError(
                "--template and --group-by make conversations: use them with --schema conversation"
            )
        missing = [name for name in TEXT_COLUMNS[schema] if name not in present]
        if not any(name in present for name in (*MEDIA_COLUMNS, URL_COLUMN, PATH_COLUMN)):
            missing.append(f"{IMAGE_COLUMN} (or {AUDIO_COLUMN}, or {URL_COLUMN})")
        if group_by and group_by not in present:
            missing.append(f"{group_by} (--group-by)")
        if missing:
            raise InputError(
                f"{item.url}: missing required column(s) for the {schema} schema: {', '.join(missing)}; "
                f"found: {', '.join(item.schema.names)}"
            )
        for name in MEDIA_COLUMNS:
            column = layout.column(name)
            if column is None:
                continue
            found = item.schema.field(column)
            if pa.types.is_struct(found.type) and not is_media_struct(found):
                raise InputError(
                    f"{item.url}: column {_described(layout, name)} is a struct without a binary 'bytes' "
                    f"field ({found.type}); media must be binary or struct<bytes: binary, path: string>"
                )
            if not (is_binary(found) or is_media_struct(found)):
                raise InputError(
                    f"{item.url}: column {_described(layout, name)} must be binary, found {found.type}"
                )
        for name in (URL_COLUMN, SHA256_COLUMN):
            column = layout.column(name)
            if column is not None and not _is_text(item.schema.field(column)):
                raise InputError(
                    f"{item.url}: column {_described(layout, name)} must be text, "
                    f"found {item.schema.field(column).type}"
                )
        if schema == "conversation":
            layout = _with_turns(layout, turn_source(item, layout, template))
        layouts.append(layout)
    assert schema is not None
    return schema, layouts


def _with_turns(layout: Layout, turns: TurnSource) -> Layout:
    """The layout reading its turns from ``turns``; columns turned into ``messages`` are not
    carried into ``.json`` as they were (template columns are: they are the annotation)."""
    consumed = set() if turns.kind in TEMPLATE_FIELDS else {layout.fields[name] for name in turns.fields}
    kept = [(c, n) for c, n in zip(layout.json_columns, layout.json_names, strict=True) if c not in consumed]
    return Layout(layout.fields, [c for c, _ in kept], [n for _, n in kept], turns)
