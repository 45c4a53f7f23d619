"""Typed records of the run files a person may have edited: validated once, where the one reader reads them.

A run directory is something users share, archive and hand-edit; the code that shows it (report, serve,
runs, compare) must not meet a list where it expects a number. Each file is read by `fileio` (regular file,
size cap, strict UTF-8, bounded nesting) and then checked here against a pydantic model (types, ranges,
list lengths, cross-field checks); anything wrong is one `UnreadableFile` line naming the file and the field.
The rest of the code takes these records, not dicts.

pydantic is used (not hand-written checks) because it is the well-kept library for exactly this, and
already installed with the server (fastapi is built on it); `cnnkit --help` never imports it.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cnnkit.fileio import MAX_BYTES, UnreadableFile, parse_json, read_text_capped

Fraction = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0, le=2**62)]
#: A metrics value: any float (a diverged run's loss may be NaN); a list or a word is refused (a numeric string
#: reads as its number).
Number = float


def _one_line_problem(error: ValidationError) -> str:
    """pydantic's first error as 'field.sub: what is wrong (got VALUE)', the value shortened."""
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "the document"
    value = repr(first.get("input"))
    value = value if len(value) <= 60 else value[:57] + "..."
    return f"{where}: {first['msg'].lower()} (got {value})"


def validate(record: type[BaseModel], value: Any, where: str | os.PathLike[str]) -> Any:
    """`value` (parsed JSON) as `record`, or UnreadableFile naming `where` and the first field at fault."""
    try:
        return record.model_validate(value)
    except ValidationError as error:
        raise UnreadableFile(f"{where}: {_one_line_problem(error)}; fix or remove that entry") from None


class _Record(BaseModel):
    """Fields cnnkit reads are typed; others a newer or older version wrote are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def __getitem__(self, key: str) -> Any:
        """`record["test_accuracy"]`: what code written for the dict these files used to be read into keeps doing."""
        values = self.model_dump()
        if key not in values:
            raise KeyError(key)
        return values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.model_dump().get(key, default)


class Selected(_Record):
    """metrics.json `selected`: which epoch's weights a run kept, and by what rule."""

    keep: str | None = None
    epoch: Annotated[int, Field(ge=1, le=10**6)] | None = None
    weights: str | None = None
    monitor: str | None = None
    value: Number | None = None


class ClassScores(_Record):
    precision: Fraction | None = None
    recall: Fraction | None = None
    f1: Fraction | None = None
    support: Count | None = None


class TestReport(_Record):
    """metrics.json `test_report`: per-class scores and the confusion matrix (square, one row per class)."""

    per_class: dict[str, ClassScores] = Field(default_factory=dict)
    macro_f1: Fraction | None = None
    balanced_accuracy: Fraction | None = None
    confusion_matrix: list[list[Count]] | None = None

    @model_validator(mode="after")
    def _square(self) -> TestReport:
        matrix = self.confusion_matrix
        if matrix is not None and any(len(row) != len(matrix) for row in matrix):
            raise ValueError("confusion_matrix must be square (one row and one column per class)")
        return self


class Imbalance(_Record):
    """metrics.json `imbalance`: largest over smallest training class count (above 2), and the rare classes."""

    ratio: Annotated[float, Field(ge=1)]
    rare: list[str] = Field(default_factory=list)


class Metrics(_Record):
    """metrics.json: what a finished run measured (written by api.collect_metrics)."""

    test_accuracy: Fraction | None = None
    test_accuracy_ci95: Annotated[list[Fraction], Field(min_length=2, max_length=2)] | None = None
    test_loss: Number | None = None
    balanced_accuracy: Fraction | None = None
    macro_f1: Fraction | None = None
    imbalance: Imbalance | None = None
    most_confused: list[tuple[str | int, str | int, Count]] = Field(default_factory=list)
    epochs: Count | None = None
    num_test: Count | None = None
    train_seconds: Annotated[float, Field(ge=0)] | None = None
    val_accuracy: Fraction | None = None
    val_source: str | None = None
    model: str | None = None
    dataset: str | None = None
    preset: str | None = None
    selected: Selected | None = None
    test_report: TestReport | None = None

    def scalars(self) -> dict[str, Any]:
        """Every top-level entry that is a single value (for a facts table), recorded order kept."""
        given = self.model_fields_set | set(self.model_extra or {})
        return {key: value for key, value in self.model_dump().items()
                if key in given and not isinstance(value, (dict, list, tuple))}


def read_metrics(path: str | os.PathLike[str]) -> Metrics:
    """metrics.json as a Metrics record (UnreadableFile on anything wrong; FileNotFoundError when missing)."""
    value = parse_json(read_text_capped(path, MAX_BYTES["json"]), str(path))
    if not isinstance(value, dict):
        raise UnreadableFile(f"{path}: not a JSON object; restore the run's metrics.json")
    return validate(Metrics, value, path)


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, recursively: what strict JSON can carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


class HistoryTable(BaseModel):
    """history.csv: one row per epoch, each a number or empty under each column; `epoch` is 1, 2, 3, ..."""

    model_config = ConfigDict(frozen=True)

    columns: list[str]
    rows: list[list[float | None]]

    @model_validator(mode="after")
    def _consistent(self) -> HistoryTable:
        if not self.columns or self.columns[0] != "epoch":
            raise ValueError("the first column must be 'epoch'")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("a column name appears twice")
        for number, row in enumerate(self.rows, start=1):
            if len(row) != len(self.columns):
                raise ValueError(f"row {number} has {len(row)} values for {len(self.columns)} columns")
            if row[0] != number:
                raise ValueError(f"row {number} is epoch {row[0]}, not {number}")
        return self

    def column(self, name: str) -> list[float | None]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]

    def as_dicts(self) -> list[dict[str, float | None]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def _cell(text: str) -> float | None:
    return None if text.strip() == "" else float(text)


def parse_history(text: str, where: str | os.PathLike[str]) -> HistoryTable:
    """history.csv text as a HistoryTable (UnreadableFile naming `where` and the row at fault)."""
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise UnreadableFile(f"{where}: not a readable CSV file ({error})") from None
    if not lines:
        raise UnreadableFile(f"{where}: empty; a history.csv starts with the header line 'epoch,...'")
    columns, body = lines[0], [line for line in lines[1:] if line]
    try:
        rows = [[_cell(cell) for cell in line] for line in body]
    except ValueError as error:
        raise UnreadableFile(f"{where}: a value that is not a number ({error})") from None
    try:
        return HistoryTable(columns=columns, rows=rows)
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise UnreadableFile(f"{where}: {problem}") from None


def read_history_table(path: str | os.PathLike[str]) -> HistoryTable:
    """history.csv through the one reader, as a HistoryTable."""
    return parse_history(read_text_capped(path, MAX_BYTES["csv"]), path)

