"""`metadata.jsonl` / `metadata.csv` beside images, in the Hugging Face imagefolder convention.

Each row names an image by `file_name` (relative to the metadata file's folder) and may give a
`label` (a class name or a class index), a `text` caption, and any other scalar columns, which
become per-image attributes. Problems are errors that name the file and the line.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
EXAMPLE_ROW = '{"file_name": "0001.png", "text": "a photo of a cat", "label": "cat"}'


@dataclass
class MetadataRow:
    """One row: the image it names, where it was written (for messages), its other columns."""
    path: Path
    where: str  # "metadata.jsonl line 3"
    columns: dict = field(default_factory=dict)


def find_metadata(root: Path) -> list[Path]:
    """Every metadata file under root, in path order; two in one folder is an error."""
    found = sorted(p for name in METADATA_FILES for p in root.rglob(name) if p.is_file())
    folders = [p.parent for p in found]
    twice = next((f for f in folders if folders.count(f) > 1), None)
    if twice is not None:
        raise ValueError(f"{twice} holds both metadata.jsonl and metadata.csv; keep one of them.")
    return found


def read_metadata(path: Path, root: Path | None = None,
                  image_column: str = "file_name") -> list[MetadataRow]:
    """The rows of one metadata file, each image (named in `image_column`) checked to exist inside `root`.

    `root` defaults to the file's folder. A file_name is resolved (symlinks too) before the check, so
    "../x.png", an absolute path or a link that leads out of the data folder is refused with the row
    that names it.
    """
    root = Path(root) if root is not None else path.parent
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path, image_column)
    out, seen = [], {}
    for line, columns in rows:
        where = f"{path} line {line}"
        name = columns.pop(image_column, None)
        if not isinstance(name, str) or not name:
            named = "" if image_column == "file_name" else f" (image_column={image_column!r}); its columns are " \
                f"{sorted(columns)}"
            raise ValueError(f"{where} has no {image_column}{named}; every row names its image, e.g. {EXAMPLE_ROW}.")
        image = _inside(path, root, name, f"{where}: {image_column}")
        if image in seen:
            raise ValueError(f"{where}: {name!r} is listed twice (also at line {seen[image]}); "
                             "list each image once.")
        seen[image] = line
        out.append(MetadataRow(image, where, columns))
    if not out:
        raise ValueError(f"{path} lists no images; add one row per image, e.g. {EXAMPLE_ROW}.")
    return out


def _inside(path: Path, root: Path, name: str, where: str) -> Path:
    """The image a row names, spelled from root; an error naming the row if it is outside root or missing."""
    named = path.parent / name                      # an absolute name replaces the folder
    target, top = named.resolve(), root.resolve()   # resolve() follows links, which text cannot see through
    if not target.is_relative_to(top):
        leads = f" (it leads to {target})" if target != named else ""
        raise ValueError(f"{where} {name!r} is outside the data folder {root}{leads}; name each image "
                         "by its path relative to the metadata file, inside the folder (copy the image in if "
                         "it belongs to the data set).")
    # spelled root/relative, as the folder's own listing spells it, so the two can be compared
    relative = Path(os.path.relpath(named, root))
    image = root / (relative if relative.parts[:1] != ("..",) else target.relative_to(top))
    if not image.is_file():
        raise FileNotFoundError(f"{where} {name!r} does not exist (looked for {image}); "
                                "fix the name or remove the line.")
    return image


def read_text_file(path: Path) -> str:
    """The file as text; a file that is not UTF-8 is an error naming it and the first bad line."""
    data = path.read_bytes()
    try:
        # utf-8-sig: spreadsheet programs often start a UTF-8 CSV with a byte-order mark
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at line {line} is not valid "
                         "UTF-8; Latin-1 or Windows-1252 files look like this); save it as UTF-8 (in a "
                         "spreadsheet or editor: Save As, encoding UTF-8) and try again.") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for line, text in enumerate(read_text_file(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {line} is not JSON ({err.msg} at column {err.colno}); "
                             f"each line is one JSON object, e.g. {EXAMPLE_ROW}.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {line} is a JSON {type(row).__name__}, not an object; "
                             f"each line is one JSON object, e.g. {EXAMPLE_ROW}.")
        rows.append((line, row))
    return rows


def _read_csv(path: Path, image_column: str = "file_name") -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""))
    header = next(reader, None)
    if not header or image_column not in header:
        raise ValueError(f"{path} line 1 has columns {header}, without {image_column}; the first line names "
                         f"the columns, e.g. {image_column},text,label (or set image_column to the column "
                         "that names the images).")
    rows, start = [], reader.line_num + 1
    for cells in reader:
        # reader.line_num is the physical line the row ended on (a quoted caption may span lines)
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise ValueError(f"{path} line {line} has {len(cells)} fields but the header has {len(header)} "
                             f"({','.join(header)}); a caption with a comma must be in double quotes, e.g. "
                             '0001.png,"a cat, sleeping" (write a quote inside one as "").')
        rows.append((line, dict(zip(header, cells))))
    return rows


def column_values(rows: list[MetadataRow], name: str, caption: bool = False) -> list | None:
    """The values of one column for every row, or None if no row has it; a gap is an error.

    A caption column holds strings, and "" (an empty caption) is a value there, not a gap.
    """
    if not any(name in r.columns for r in rows):
        return None
    for r in rows:
        value = r.columns.get(name)
        if value is None or (value == "" and not caption):
            hint = ' (an empty caption is "")' if caption else ""
            raise ValueError(f"{r.where} has no {name!r} while other rows do; give every row a {name}{hint}.")
        if caption and not isinstance(value, str):
            raise ValueError(f"{r.where}: {name} is {value!r}, not a string; write the caption in quotes.")
    return [r.columns[name] for r in rows]


def labels_from_column(rows: list[MetadataRow]) -> tuple[list[int], list[str]] | None:
    """Class indices and names from the `label` column: all names, or all indices 0..K-1."""
    values = column_values(rows, "label")
    if values is None:
        return None
    from_csv = rows[0].where.split(" line ")[0].endswith(".csv")
    kinds = [_label_kind(v, from_csv) for v in values]
    if len(set(kinds)) > 1 or "other" in kinds:
        first = {k: i for i, k in reversed(list(enumerate(kinds)))}
        shown = "; ".join(f"{k} at {rows[i].where}: {values[i]!r}" for k, i in sorted(first.items()))
        raise ValueError(f"the label column mixes types ({shown}); use class names (strings) throughout "
                         "or class indices (integers 0..K-1) throughout.")
    if kinds[0] == "int":
        indices = [int(v) for v in values]
        if min(indices) < 0:
            i = indices.index(min(indices))
            raise ValueError(f"{rows[i].where}: label {indices[i]} is negative; class indices are 0..K-1.")
        return indices, [str(i) for i in range(max(indices) + 1)]
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    return [index[v] for v in values], names


def _label_kind(value, from_csv: bool) -> str:
    if isinstance(value, bool):
        return "other"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        # a CSV holds only text: a cell that reads as an integer is a class index
        return "int" if from_csv and value.strip().lstrip("-").isdigit() else "str"
    return "other"


def attribute_columns(rows: list[MetadataRow], caption_column: str | None = "text") -> dict[str, list] | None:
    """Every column but the label and the captions whose values are scalars, as {name: values}; None if none."""
    names = sorted({k for r in rows for k in r.columns} - {"label", "text", caption_column})
    out = {}
    for name in names:
        values = [r.columns.get(name) for r in rows]
        if all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            out[name] = values
    return out or None
