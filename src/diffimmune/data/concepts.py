"""Concept sets: any captioned image folder (the concept world's or a user's), read and sliced by concept.

The folder follows the Hugging Face "imagefolder" layout: image files plus `metadata.jsonl` (or
`metadata.csv`) whose rows hold at least `file_name` and `text`; every other column is a label
(`shape`, `style`, `artist`, ...). A concept is named `"column=value"`, or by a bare value found in
exactly one label column, or, in a folder without labels, by a word of the captions.

This module owns reading such folders, selecting a concept's rows, and loading their images and prompts.
Images are read lazily, so a corrupt file is reported when its images are first asked for.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffimmune.errors import DiffImmuneError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
REQUIRED_COLUMNS = ("file_name", "text")

_WORD_PATTERN = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class ConceptRecord:
    """One captioned image: where it is, its caption, and its label columns as strings."""

    path: Path
    text: str
    labels: Mapping[str, str]


class ConceptSet:
    """The records of one captioned image folder, or a selection of them."""

    def __init__(self, root: Path, records: Sequence[ConceptRecord], label_columns: Sequence[str]):
        self.root = root
        self._records = tuple(records)
        self.label_columns = tuple(label_columns)

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> ConceptSet:
        root = Path(path)
        if not root.is_dir():
            raise DiffImmuneError(f"concept folder {root} does not exist: check the path")
        metadata_path = next((root / name for name in METADATA_FILES if (root / name).is_file()), None)
        if metadata_path is None:
            raise DiffImmuneError(
                f"{root} has no metadata.jsonl or metadata.csv: add one with file_name,text columns"
            )
        rows = _read_jsonl(metadata_path) if metadata_path.suffix == ".jsonl" else _read_csv(metadata_path)
        if not rows:
            raise DiffImmuneError(f"{metadata_path} has no rows: add one row per image with file_name,text")
        records = []
        label_columns: dict[str, None] = {}  # an ordered set: columns in the order they first appear
        for line_number, row in rows:
            records.append(_record_from_row(root, metadata_path, line_number, row))
            label_columns.update(dict.fromkeys(records[-1].labels))
        return cls(root, records, list(label_columns))

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"ConceptSet({self.root}, {len(self)} images, labels={list(self.label_columns)})"

    @property
    def records(self) -> tuple[ConceptRecord, ...]:
        return self._records

    def concepts(self, column: str) -> list[str]:
        """The distinct values of one label column, sorted."""
        if column not in self.label_columns:
            raise DiffImmuneError(
                f"{self.root} has no label column {column!r}: available columns are "
                f"{_listing(self.label_columns)}"
            )
        return sorted({record.labels[column] for record in self._records if column in record.labels})

    def select(self, concept: str) -> ConceptSet:
        """The records showing `concept`: "column=value", a bare label value, or a caption word."""
        if "=" in concept:
            column, value = (part.strip() for part in concept.split("=", 1))
            return self._with_records(self._matching_column(column, value))
        value = concept.strip()
        if not self.label_columns:
            return self._with_records(self._matching_caption(value))
        columns = [
            column
            for column in self.label_columns
            if any(_same(value, record.labels.get(column)) for record in self._records)
        ]
        if len(columns) > 1:
            choices = ", ".join(f"{column}={value}" for column in columns)
            raise DiffImmuneError(f"concept {value!r} is ambiguous in {self.root}: write one of {choices}")
        if not columns:
            available = "; ".join(
                f"{column}: {_listing(self.concepts(column))}" for column in self.label_columns
            )
            raise DiffImmuneError(f"concept {value!r} not found in {self.root}: available are {available}")
        return self._with_records(self._matching_column(columns[0], value))

    def prompts(self, concept: str | None = None) -> list[str]:
        selected = self if concept is None else self.select(concept)
        return [record.text for record in selected._records]

    def images(self, concept: str | None = None, size: int | None = None) -> torch.Tensor:
        """The images as a float tensor (N, 3, H, W) in [0, 1].

        With `size`, each image is resized (shorter side) and centre-cropped to size x size, as
        diffusers' training scripts do; without it all images must already share one size.
        """
        selected = self if concept is None else self.select(concept)
        arrays = [_load_rgb(record.path, size) for record in selected._records]
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            examples = {
                array.shape: record.path.name for array, record in zip(arrays, selected._records, strict=True)
            }
            listed = ", ".join(f"{name} is {shape[1]}x{shape[0]}" for shape, name in examples.items())
            raise DiffImmuneError(f"images in {self.root} differ in size ({listed}): pass size=...")
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return batch.float().div_(255.0).contiguous()

    def _matching_column(self, column: str, value: str) -> list[ConceptRecord]:
        available = self.concepts(column)  # also checks the column exists
        matching = [record for record in self._records if _same(value, record.labels.get(column))]
        if not matching:
            raise DiffImmuneError(
                f"concept {column}={value} not found in {self.root}: {column} takes {_listing(available)}"
            )
        return matching

    def _matching_caption(self, phrase: str) -> list[ConceptRecord]:
        phrase_words = _words(phrase)
        matching = [record for record in self._records if _contains_run(_words(record.text), phrase_words)]
        if not phrase_words or not matching:
            raise DiffImmuneError(
                f"concept {phrase!r} not found in {self.root}: no caption contains it as a word "
                "(the folder has no label columns to match against)"
            )
        return matching

    def _with_records(self, records: list[ConceptRecord]) -> ConceptSet:
        return ConceptSet(self.root, records, self.label_columns)


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DiffImmuneError(
                    f"{path} line {line_number} is not valid JSON ({error.msg}): write one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise DiffImmuneError(
                    f"{path} line {line_number} is not a JSON object: write one {{...}} object per line"
                )
            rows.append((line_number, row))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        # reader.line_num is the line a row ended on, which stays right when a caption spans lines.
        return [(reader.line_num, row) for row in reader]


def _record_from_row(root: Path, metadata_path: Path, line_number: int, row: dict) -> ConceptRecord:
    for column in REQUIRED_COLUMNS:
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise DiffImmuneError(
                f"{metadata_path} line {line_number} has no {column!r}: every row needs file_name and text"
            )
    image_path = root / row["file_name"]
    if not image_path.is_file():
        raise DiffImmuneError(
            f"{metadata_path} line {line_number} names {image_path}, which does not exist: "
            "fix file_name or add the image"
        )
    labels = {
        column: _label_text(value)
        for column, value in row.items()
        if column not in REQUIRED_COLUMNS and column is not None and value is not None
    }
    return ConceptRecord(path=image_path, text=row["text"].strip(), labels=labels)


def _label_text(value: object) -> str:
    # JSON booleans become "true"/"false" so that "held_out=true" matches in jsonl and csv alike.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, sort_keys=True)


def _same(value: str, label: str | None) -> bool:
    return label is not None and value.lower() == label.lower()


def _words(text: str) -> list[str]:
    return _WORD_PATTERN.findall(text.lower())


def _contains_run(words: list[str], run: list[str]) -> bool:
    return any(words[start : start + len(run)] == run for start in range(len(words) - len(run) + 1))


def _listing(values: Sequence[str], limit: int = 20) -> str:
    if not values:
        return "(none)"
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _load_rgb(path: Path, size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DiffImmuneError(f"cannot read image {path} ({reason}): replace or remove it") from None
    if size is not None:
        rgb = _resize_and_centre_crop(rgb, size)
    return np.asarray(rgb, dtype=np.uint8)


def _resize_and_centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    resized_width, resized_height = max(size, round(width * scale)), max(size, round(height * scale))
    if (resized_width, resized_height) != (width, height):
        image = image.resize((resized_width, resized_height), Image.Resampling.BICUBIC)
    left, top = (resized_width - size) // 2, (resized_height - size) // 2
    return image.crop((left, top, left + size, top + size))
