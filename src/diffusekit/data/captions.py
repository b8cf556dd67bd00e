"""Captions from metadata columns: which column holds them, or a template that builds them from several.

A template is a Python format string over a row's columns, e.g. "{text}, {style} style". A null
value (JSON null, or an empty CSV cell) renders as empty, and a comma-separated part of the
template whose every field is empty is left out with its comma: "{text}, {skin_tone} skin tone,
{style} style" gives "thumbs up sign, noto style" for a row whose skin_tone is null.
"""
from __future__ import annotations

import re
import string

from diffusekit.config import ConfigError
from diffusekit.data.metadata import MetadataRow, column_values

FALLBACK_CAPTION_COLUMN = "caption"   # read when the default column, "text", is absent
EXAMPLE_TEMPLATE = '"{text}, {style} style"'


def template_fields(template: str) -> list[str]:
    """The column names a caption template formats; ConfigError if it is malformed or names none."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"caption_template={template!r} is not a format string ({e}); write columns in "
                          f"braces, e.g. {EXAMPLE_TEMPLATE} (a literal brace is {{{{ or }}}}).") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    positional = [name for name in fields if not _column(name) or _column(name).isdigit()]
    if positional:
        raise ConfigError(f"caption_template={template!r} has a field {{{positional[0]}}} without a column "
                          f"name; name a metadata column in each pair of braces, e.g. {EXAMPLE_TEMPLATE}.")
    if not fields:
        raise ConfigError(f"caption_template={template!r} names no column, so every image would get this "
                          f"same caption; put metadata columns in braces, e.g. {EXAMPLE_TEMPLATE}.")
    return [_column(name) for name in fields]


def _column(field_name: str) -> str:
    """The column of a format field: 'style' of 'style', 'style.upper' or 'style[0]'."""
    return re.split(r"[.\[]", field_name, maxsplit=1)[0]


def format_caption(template: str, columns: dict, where: str) -> str:
    """One row's caption from its columns; a missing column is an error naming the row and the columns."""
    for name in template_fields(template):
        if name not in columns:
            raise ValueError(f"{where} has no column {name!r} for caption_template={template!r}; its columns are "
                             f"{sorted(columns)}. Give every row a {name} (null for none), or change the template.")
    parts = []
    for part in _split_top_level_commas(template):
        names = [_column(f) for _, f, _, _ in string.Formatter().parse(part) if f is not None]
        values = {n: _shown(columns[n]) for n in names}
        if names and all(v == "" for v in values.values()):
            continue  # every field of this part is null: leave the part and its comma out
        try:
            text = part.format_map({n: columns[n] if values[n] != "" else "" for n in names})
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            raise ValueError(f"{where}: caption_template={template!r} cannot format {values} ({e}); "
                             "write plain {column} fields, e.g. " + EXAMPLE_TEMPLATE + ".") from None
        parts.append(re.sub(r" {2,}", " ", text) if "" in values.values() else text)
    return ",".join(parts).strip().strip(",").strip()


def _shown(value) -> str:
    return "" if value is None else str(value)


def _split_top_level_commas(template: str) -> list[str]:
    """The template cut at commas outside braces (a format spec such as {n:,} keeps its comma)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(template):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(template[start:i])
            start = i + 1
    return parts + [template[start:]]


def captions_from_rows(rows: list[MetadataRow], caption_column: str = "text", template: str = ""):
    """(captions or None, the column they came from or None, notes) for metadata rows.

    With a template, every row's caption is formatted from its columns. Otherwise the captions are
    `caption_column`; the default "text", when no row has it, falls back to a "caption" column
    (with a note saying so). A column asked for by name that no row has is an error.
    """
    if template:
        return [format_caption(template, r.columns, r.where) for r in rows], None, \
            [f"captions: caption_template {template!r} over the metadata columns"]
    present = {k for r in rows for k in r.columns}
    column, notes = caption_column, []
    if column == "text" and "text" not in present and FALLBACK_CAPTION_COLUMN in present:
        column = FALLBACK_CAPTION_COLUMN
        notes.append("captions: from the 'caption' column (there is no 'text' column); set caption_column="
                     "'caption' (--caption-column caption) to say so and silence this note")
    elif column not in present and column != "text":
        raise ValueError(f"caption_column={column!r} is not a column of {_source(rows)}; its columns are "
                         f"{sorted(present)}. Choose one of them, or add {column!r} to every row.")
    captions = column_values(rows, column, caption=True)
    return captions, (column if captions is not None else None), notes


def template_over_columns(template: str, columns: dict[str, list], wheres: list[str]) -> list[str]:
    """A template applied to per-image values {column: values} (NAME.txt captions as `text`, shapes' attributes)."""
    return [format_caption(template, {k: v[i] for k, v in columns.items()}, w) for i, w in enumerate(wheres)]


def _source(rows: list[MetadataRow]) -> str:
    return rows[0].where.rsplit(" line ", 1)[0].rsplit(" row ", 1)[0]
