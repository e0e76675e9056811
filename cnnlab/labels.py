"""Labels from a file (``--labels FILE``): a CSV or TSV table whose header names the columns
``image`` (a path relative to the data folder, or absolute), ``label`` (its class) and, optionally,
``split`` (train, val or test), one row per image. Read and checked here, before any image is
decoded: a bad row is a one-line error naming the file, its line and the fix. The images are then
decoded as a folder's are (folders.py). With several labels per image (``--multi-label``), a row's label
holds class names separated by ``;`` (``cat;dog``)."""
from __future__ import annotations

import csv
import functools
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import CnnlabError
from .text import shown

# what a split column may say, and the split each means (val, valid and validation are one)
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
HEADER = "image,label (and optionally split)"
SEPARATOR = ";"  # between the class names of a row's label, with --multi-label


def label_set(label: str) -> tuple[str, ...]:
    """The class names of a multi-label row's ``label``: split on ``;``, each stripped, empty parts
    and repeats dropped, in the order given."""
    return tuple(dict.fromkeys(part.strip() for part in label.split(SEPARATOR) if part.strip()))


@dataclass(frozen=True)
class Row:
    """One image of a labels file: its path as given, the file it names, its class, its split
    (None: the file has no split column) and its line in the file."""
    image: str
    file: str
    label: str
    split: str | None
    line: int


@dataclass(frozen=True)
class LabelsFile:
    """A labels file read and checked: where it is and its rows, in the file's order; with
    ``multi_label``, each row's label is a set of class names (``label_set``)."""
    path: Path
    rows: tuple[Row, ...]
    split_column: bool
    multi_label: bool = False

    def names(self, row: Row) -> tuple[str, ...]:
        """The class names of ``row``: its label, or with ``multi_label`` the names it lists."""
        return label_set(row.label) if self.multi_label else (row.label,)

    @property
    def classes(self) -> list[str]:
        """The class names: the labels (every name a multi-label file lists), sorted."""
        return sorted({name for row in self.rows for name in self.names(row)})

    def check_classes(self, class_names: list[str] | None = None) -> None:
        """A one-line error naming the first row whose label is not one of ``class_names`` (a run's);
        without them, one for a file of fewer than two classes (none to train a classifier on)."""
        if class_names is None:
            if len(self.classes) < 2:
                raise CnnlabError(f"labels file {shown(self.path)} has only one class ({shown(self.classes[0])}); a "
                                  "classifier needs at least two labels")
            return
        known = set(class_names)
        for row in self.rows:
            for label in self.names(row):
                if label not in known:
                    names = ", ".join(map(shown, class_names[:10])) + (", ..." if len(class_names) > 10 else "")
                    raise CnnlabError(f"{self.at(row.line)}: label {shown(label)} is not one of the run's classes "
                                      f"({names}); fix the label or remove the row")

    def at(self, line: int) -> str:
        return _at(self.path, line)


def _at(path: Path, line: int) -> str:
    """``FILE:LINE``, as an error names a row."""
    return f"{shown(path)}:{line}"


def read_labels(path: str | Path, root: str | Path, multi_label: bool = False) -> LabelsFile:
    """The labels file at ``path``, relative image paths taken from ``root`` (the data folder); a
    one-line error for a missing column, a row with a missing image file, an empty label (with
    ``multi_label``: a label naming no class, such as ``;``), an unknown split, an image listed
    twice, or no row at all."""
    path, root = Path(path), Path(root)
    text = _text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text, multi_label),
                        skipinitialspace=True)
    where = functools.partial(_at, path)
    try:
        header = next(reader, None)
        if header is None:
            raise CnnlabError(f"labels file {shown(path)} is empty; its first line names the columns: {HEADER}")
        names = [name.strip().lower() for name in header]
        for column in ("image", "label"):
            if column not in names:
                raise CnnlabError(f"{where(1)}: the header has no {column} column (it reads: "
                                  f"{', '.join(map(shown, header))}); name the columns on the first line: {HEADER}")
        columns = {name: names.index(name) for name in ("image", "label", "split") if name in names}
        rows: list[Row] = []
        seen: dict[str, int] = {}
        for fields in reader:
            if any(field.strip() for field in fields):  # blank lines are skipped
                rows.append(_row(fields, len(header), columns, root, where(reader.line_num), reader.line_num))
                if multi_label and not label_set(rows[-1].label):
                    raise CnnlabError(f"{where(reader.line_num)}: label {shown(rows[-1].label)} of "
                                      f"{shown(rows[-1].image)} names no class; list its classes separated by "
                                      f"'{SEPARATOR}' (cat;dog), or remove the row")
                if rows[-1].file in seen:
                    raise CnnlabError(f"{where(reader.line_num)}: {shown(rows[-1].image)} is listed already, on line "
                                      f"{seen[rows[-1].file]}; list each image once")
                seen[rows[-1].file] = reader.line_num
    except csv.Error as exc:
        raise CnnlabError(f"{where(reader.line_num)}: not a CSV or TSV line ({exc}); save the file as UTF-8 text "
                          "with one image a line") from None
    if not rows:
        raise CnnlabError(f"labels file {shown(path)} lists no images; add a line for each image after the header "
                          f"({HEADER})")
    return LabelsFile(path, tuple(rows), "split" in columns, multi_label)


def _row(fields: list[str], width: int, columns: dict, root: Path, where: str, line: int) -> Row:
    if len(fields) > width and not any(field.strip() for field in fields[width:]):
        fields = fields[:width]  # trailing delimiters, as spreadsheets may write them
    if len(fields) != width:
        raise CnnlabError(f"{where}: {len(fields)} field(s) where the header names {width}; put the image, its label "
                          "(and its split) on each line, quoting a value that holds the delimiter")
    image, label = fields[columns["image"]].strip(), fields[columns["label"]].strip()
    if not image:
        raise CnnlabError(f"{where}: no image path; give the image's path (relative to --data, or absolute) or "
                          "remove the row")
    if not label:
        raise CnnlabError(f"{where}: empty label for {shown(image)}; give the image its class, or remove the row")
    split = None
    if "split" in columns:
        value = fields[columns["split"]].strip()
        split = SPLIT_VALUES.get(value.lower())
        if split is None:
            raise CnnlabError(f"{where}: unknown split {shown(value) if value else '(empty)'} for {shown(image)}; "
                              "write train, val or test (val, valid and validation are the same)")
    file = os.path.normpath(image if os.path.isabs(image) else root.resolve() / image)
    if not os.path.isfile(file):
        raise CnnlabError(f"{where}: image {shown(image)} not found (no file {shown(file)}); fix its path (relative "
                          f"to --data {shown(root)}, or absolute) or remove the row")
    return Row(image, file, label, split, line)


def _text(path: Path) -> str:
    """The file's text: UTF-8 (a byte-order mark skipped) or UTF-16 with its mark; bytes that are
    not UTF-8 kept as the file names they may be (surrogate escapes, as os.fsdecode keeps them)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CnnlabError(f"labels file {shown(path)} does not exist; pass --labels with a CSV or TSV file whose "
                          f"header names the columns {HEADER}") from None
    if not stat.S_ISREG(mode):
        raise CnnlabError(f"--labels {shown(path)} is not a regular file; pass a CSV or TSV file")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # "Unicode text" as spreadsheets save it
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8", errors="surrogateescape")


def _delimiter(path: Path, text: str, multi_label: bool = False) -> str:
    """A comma for .csv, a tab for .tsv and .tab, when the header holds it; else the delimiter
    csv.Sniffer finds in the first lines (comma, tab, semicolon or bar; no semicolon with
    ``multi_label``, where it separates a row's classes)."""
    first = text.splitlines()[0] if text.strip() else ""
    given = DELIMITERS.get(path.suffix.lower())
    if given is not None and given in first:
        return given
    candidates = ",\t|" if multi_label else ",\t;|"
    try:
        return csv.Sniffer().sniff(text[:65536], delimiters=candidates).delimiter
    except csv.Error:
        found = [d for d in candidates if d in first]
        if found:
            return found[0]
        if given is not None or not first:
            return given or ","
        raise CnnlabError(f"cannot tell how the columns of {shown(path)} are separated; name it .csv (commas) or "
                          f".tsv (tabs), with a header {HEADER}") from None
