"""report.html: one page that tells a person what a run did, built from the run directory's files alone.

The page is self-contained (inline CSS, every figure embedded as a base64 data URI, no scripts, links to
other resources or web fonts), so it can be mailed, archived or opened offline and still shows everything.
It reads only config.json, metrics.json, history.csv, model.json and the PNGs, so `cnnkit report RUN`
rebuilds it for any run, old or new; it needs no torch and no matplotlib, so that is instant. The files are
read through the one reader into typed records (records.py): a hand-edited file with a wrong value is one
line naming the file and the field. Every piece of text from the files is escaped: class names and paths
may hold < or &. Only regular PNG files inside the run directory are embedded (a link pointing out is not).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError
from cnnkit.fileio import MAX_BYTES, UnreadableFile, read_capped, read_text_capped, write_text
from cnnkit.config import RunConfig, read_run_config
from cnnkit.model_meta import ModelMeta, read_model_meta
from cnnkit.records import HistoryTable, Metrics, read_history_table, read_metrics
from cnnkit import __version__

REPORT_FILE = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Z95 = 1.959963984540054  # two-sided 95% normal quantile

# Known figures first, in the order a reader wants them, each with what to look for; any other PNG in
# the run directory follows with its file name as caption.
FIGURE_CAPTIONS = {
    "history.png": "Learning curves: accuracy and loss per epoch on the training and validation data. "
                   "The dotted line marks the epoch whose weights were kept.",
    "confusion_matrix.png": "Confusion matrix on the test set: rows are the true class, columns the "
                            "prediction; colour is the share of the true class's images, so the "
                            "off-diagonal cells are the mistakes.",
    "per_class.png": "Precision and recall per class on the test set.",
    "errors.png": "The test images the model got wrong with the highest confidence: true → predicted "
                  "(confidence, rounded down).",
    "errors_why.png": "The same errors with Grad-CAM heatmaps of the class each was taken for: red is where the "
                      "evidence for the wrong answer lay.",
}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.subtitle { color: #555; margin-top: 0; }
.headline { background: #f4f6fa; border-radius: 8px; padding: 1rem 1.4rem; margin: 1.2rem 0; }
.headline .big { font-size: 2.4rem; font-weight: 650; }
.headline .interval { font-size: 1.1rem; color: #333; margin-left: 0.6rem; }
.warning { color: #8a1c00; font-weight: 600; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92rem; margin-top: 0.3rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { padding: 0.2rem 0.7rem; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f4f6fa; } td.text, th.text { text-align: left; }
tr.kept td { background: #fff4cc; font-weight: 600; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em; }
footer { margin-top: 3rem; color: #777; font-size: 0.85rem; }
"""


@dataclass
class RunFiles:
    """What a run directory holds, as read from disk (every part optional except one of config/metrics)."""

    path: Path
    config: RunConfig = field(default_factory=RunConfig)
    metrics: Metrics = field(default_factory=Metrics)
    model: ModelMeta | None = None
    history: HistoryTable | None = None
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    audit: AuditFiles | None = None  # what `cnnkit audit RUN` wrote into RUN/audit


@dataclass
class AuditFiles:
    """RUN/audit as the report shows it: each CSV's header, first rows and row count (or why it could not be
    read), and the contact sheets."""

    tables: dict[str, tuple[list[str], list[list[str]], int] | str] = field(default_factory=dict)
    figures: list[tuple[str, bytes]] = field(default_factory=list)


def write_report(run_dir: Path, *, name: str | None = None) -> Path:
    """Write `run_dir/report.html` (atomically) from the run's files and return its path.

    `name` is the run's name shown as the page title; by default the directory's name (see run_name for
    a run still in its hidden staging directory).
    """
    run = read_run_files(Path(run_dir))
    path = run.path / REPORT_FILE
    write_text(path, render_report(run, name or run_name(run)))
    return path


def read_run_files(run_dir: Path) -> RunFiles:
    """Read what the report needs; a directory with neither config.json nor metrics.json is not a run."""
    if not run_dir.is_dir():
        raise CnnkitError(f"{run_dir}: no such run directory")
    if not (run_dir / "config.json").is_file() and not (run_dir / "metrics.json").is_file():
        raise CnnkitError(f"{run_dir}: not a cnnkit run directory (no config.json or metrics.json)")
    try:
        return RunFiles(
            path=run_dir,
            config=read_run_config(run_dir / "config.json"),
            metrics=_optional(run_dir / "metrics.json", read_metrics, Metrics()),
            model=read_model_meta(run_dir) if (run_dir / "model.json").exists() else None,
            history=_optional(run_dir / "history.csv", read_history_table, None),
            figures=_read_figures(run_dir),
            audit=_read_audit(run_dir / AUDIT_FOLDER),
        )
    except UnreadableFile as error:
        raise CnnkitError(str(error)) from None


def _optional(path: Path, read, missing: Any) -> Any:
    """`read(path)`, or `missing` when there is no such file (an early or interrupted run lacks some)."""
    try:
        return read(path)
    except FileNotFoundError:
        return missing


#: The largest figure embedded: cnnkit's own are 30-300 kB.
MAX_FIGURE_BYTES = 32 << 20


def _read_figures(run_dir: Path) -> list[tuple[str, bytes]]:
    """Every regular PNG file in the run directory (hidden temporaries and links excluded), known figures first.

    A `*.png` link could point anywhere on the machine (a page mailed on would carry that file), so only the
    run's own files are read.
    """
    names = sorted(p.name for p in run_dir.glob("*.png") if not p.name.startswith(".") and _regular(p))
    ordered = [n for n in FIGURE_CAPTIONS if n in names] + [n for n in names if n not in FIGURE_CAPTIONS]
    figures = []
    for name in ordered:
        try:
            figures.append((name, read_capped(run_dir / name, MAX_FIGURE_BYTES, follow_links=False)))
        except (OSError, UnreadableFile):  # too large, or gone: named as left out, the page still written
            figures.append((name, b""))
    return figures


AUDIT_FOLDER = "audit"
AUDIT_TABLES = {"label_issues.csv": "likely label issues (most likely first)",
                "duplicates.csv": "duplicate pairs (exact copies first)"}
AUDIT_ROWS = 10  # rows of each audit table shown; the CSV holds them all


def _read_audit(folder: Path) -> AuditFiles | None:
    """RUN/audit's tables and sheets, when `cnnkit audit RUN` wrote them (a link named audit is not followed)."""
    if not folder.is_dir() or folder.is_symlink():
        return None
    found = AuditFiles()
    for name in AUDIT_TABLES:
        path = folder / name
        if not _regular(path):
            continue
        try:
            rows = list(csv.reader(io.StringIO(read_text_capped(path, MAX_BYTES["csv"]), newline="")))
        except (OSError, UnreadableFile, csv.Error) as error:
            found.tables[name] = f"not readable ({str(error).removeprefix(str(path) + ': ')})"
            continue
        found.tables[name] = (rows[0], rows[1 : AUDIT_ROWS + 1], len(rows) - 1) if rows else "empty"
    found.figures = [(name, data) for name, data in _read_figures(folder) if name in AUDIT_SHEETS]
    return found if found.tables or found.figures else None


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def run_name(run: RunFiles) -> str | None:
    """The directory's name; for a hidden staging directory (".train.partial-x1y2"), config.json's `name`.

    An unnamed run gets its name (train, train2, ...) only when it is committed, so a report written
    while staging does not guess one (None: the page is then titled "model on dataset").
    """
    name = run.path.name
    if name.startswith(".") and ".partial-" in name:
        return run.config.name
    return name


# --- numbers ---------------------------------------------------------------------------------------------


def wilson_interval(accuracy: float, count: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion: the range of accuracies consistent with `count` test images.

    Used only for runs whose metrics.json predates `test_accuracy_ci95`; a recorded interval is preferred.
    """
    if count <= 0:
        return 0.0, 1.0
    denominator = 1 + z * z / count
    centre = (accuracy + z * z / (2 * count)) / denominator
    half = z * math.sqrt(accuracy * (1 - accuracy) / count + z * z / (4 * count * count)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _number(value: Any, digits: int = 4) -> str:
    """A value for a table cell: floats to `digits` significant places, NaN/None as a dash."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, str):
        try:
            return _number(int(value)) if value.lstrip("-").isdigit() else _number(float(value), digits)
        except ValueError:
            return value
    return json.dumps(value)


def _percent(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}%"


# --- HTML ------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, text_columns: int = 1,
           row_classes: Sequence[str] | None = None) -> str:
    """An HTML table of already formatted (unescaped) cells; the first `text_columns` are left-aligned."""
    def cell(tag: str, i: int, value: str) -> str:
        css = ' class="text"' if i < text_columns else ""
        return f"<{tag}{css}>{_e(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        css = row_classes[r] if row_classes else ""
        opening = f'<tr class="{_e(css)}">' if css else "<tr>"
        body.append(opening + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_report(run: RunFiles, name: str | None) -> str:
    """The whole page as a string."""
    m, config = run.metrics, run.config
    model = _first_text(m.model, config.model, run.model and run.model.architecture) or "model"
    dataset = _first_text(m.dataset, config.dataset, run.model and run.model.dataset) or "dataset"
    name = name or f"{model} on {dataset}"
    sections = [
        f"<h1>{_e(name)}</h1>",
        f'<p class="subtitle">{_e(model)} trained on {_e(dataset)}</p>',
        _headline(m),
        _kept_epoch(m, len(run.history.rows) if run.history else 0),
        _most_confused(m, _classes(run)),
        _figures(run.figures),
        _audit_section(run.audit),
        _per_class_section(m),
        _history_section(run.history, m.selected.epoch if m.selected else None),
        _facts_section(m),
        _config_section(config),
        _files_section(run.path),
        _footer(),
    ]
    body = "\n".join(s for s in sections if s)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(name)}: {_e(model)} on {_e(dataset)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def _first_text(*values: Any) -> str | None:
    return next((value for value in values if isinstance(value, str) and value), None)


def _classes(run: RunFiles) -> list[str]:
    if run.model is not None:
        return list(run.model.classes)
    return list(run.metrics.test_report.per_class) if run.metrics.test_report else []


def _headline(m: Metrics) -> str:
    """Test accuracy in large type, its 95% interval, and what a finite test set means for it."""
    accuracy = m.test_accuracy
    if accuracy is None:
        return '<div class="headline"><p>No test accuracy recorded (metrics.json missing or incomplete).</p></div>'
    count = m.num_test
    interval = m.test_accuracy_ci95
    computed = False
    if not (isinstance(interval, (list, tuple)) and len(interval) == 2) and isinstance(count, int) and count > 0:
        interval, computed = wilson_interval(float(accuracy), count), True
    parts = [f'<span class="big">{_e(_percent(accuracy))}</span> test accuracy']
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        low, high = (float(v) for v in interval)
        parts.append(f'<span class="interval">95% interval {_e(_percent(low, 1))} – {_e(_percent(high, 1))}</span>')
    lines = [" ".join(parts)]
    images = f"{count:,} test images" if isinstance(count, int) else "a finite test set"
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        lines.append(f"Measured once on {_e(images)}. A finite test set gives an estimate, not the exact "
                     f"accuracy: on other images like these, this model would likely score between "
                     f"{_e(_percent(low, 1))} and {_e(_percent(high, 1))} (Wilson 95% interval"
                     f"{', computed here from the accuracy and the test-set size' if computed else ''}).")
    else:
        lines.append(f"Measured once on {_e(images)}: the test set is finite, so this is an estimate of the "
                     f"accuracy on new images, not an exact value.")
    extras = [f"Test loss {_number(m.test_loss)}"]
    macro_f1 = m.test_report.macro_f1 if m.test_report else None
    if macro_f1 is not None:
        extras.append(f"macro F1 {_number(macro_f1)}")
    lines.append(_e(", ".join(extras) + "."))
    if m.imbalance is not None:
        rare = ", ".join(m.imbalance.rare[:8]) + (" ..." if len(m.imbalance.rare) > 8 else "")
        balanced = f"balanced accuracy {_percent(m.balanced_accuracy)}" if m.balanced_accuracy is not None else ""
        lines.append('<span class="warning">' + _e(
            f"The training classes were imbalanced {m.imbalance.ratio:.1f}:1 (rare: {rare}): accuracy favours the "
            f"common classes; {balanced or 'the per-class recall below'} weighs every class alike.") + "</span>")
    if m.val_source == "test":
        lines.append('<span class="warning">Validation used the test set (--val test), so the test accuracy '
                     "was seen while choosing the epoch and is not an independent estimate.</span>")
    return '<div class="headline">' + "".join(f"<p>{line}</p>" for line in lines) + "</div>"


def _kept_epoch(m: Metrics, epochs_in_history: int) -> str:
    """Which epoch's weights the run kept, and by what rule: the test numbers describe those weights."""
    selected = m.selected
    epochs = m.epochs or epochs_in_history or None
    if not selected:
        return (f"<p><strong>Weights kept:</strong> those of the last epoch{f' ({epochs})' if epochs else ''}.</p>"
                if epochs else "")
    text = f"epoch {selected.epoch}" + (f" of {epochs}" if epochs else "")
    rule = []
    if selected.keep:
        rule.append(f"keep = {selected.keep}")
    if selected.monitor:
        value = selected.value
        rule.append(f"{selected.monitor} = {_number(value)}" if value is not None else selected.monitor)
    if selected.weights:
        rule.append(f"{selected.weights} weights")
    return (f"<p><strong>Weights kept:</strong> {_e(text)}"
            + (f" ({_e('; '.join(rule))})" if rule else "") + ". The test numbers above are for these weights.</p>")


def _most_confused(m: Metrics, classes: list[str]) -> str:
    """The top confusions: from metrics.json's `most_confused`, else from its confusion matrix."""
    pairs = m.most_confused
    if not pairs:
        pairs = _top_confusions(m.test_report.confusion_matrix if m.test_report else None, classes)
    if not pairs:
        return ""

    def label(value: Any) -> str:
        return classes[value] if isinstance(value, int) and 0 <= value < len(classes) else str(value)

    items = "".join(f"<li>{_e(label(true))} → {_e(label(pred))}: {_e(_number(count))} "
                    f"image{'s' if count != 1 else ''}</li>" for true, pred, count in pairs)
    return f"<p><strong>Most confused (true → predicted, test set):</strong></p><ul>{items}</ul>"


def _top_confusions(matrix: Any, classes: list[str], top: int = 3) -> list[list[Any]]:
    if not matrix or len(classes) != len(matrix):
        return []
    cells = [(count, i, j) for i, row in enumerate(matrix) for j, count in enumerate(row) if i != j and count > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [[classes[i], classes[j], count] for count, i, j in cells[:top]]


def _figures(figures: list[tuple[str, bytes]]) -> str:
    """Every PNG embedded as a data URI with a caption (a file that is not a PNG is named, not embedded)."""
    if not figures:
        return ""
    blocks = ["<h2>Figures</h2>"]
    for name, data in figures:
        caption = FIGURE_CAPTIONS.get(name, name)
        if not data.startswith(PNG_SIGNATURE):
            blocks.append(f"<p>{_e(name)}: not a valid PNG file, left out.</p>")
            continue
        blocks.append(_figure(name, data, caption))
    return "\n".join(blocks)


def _figure(name: str, data: bytes, caption: str) -> str:
    """One PNG embedded as a data URI, captioned with its file name and what it shows."""
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption><code>{_e(name)}</code>: {_e(caption)}</figcaption></figure>")


AUDIT_SHEETS = {"label_issues.png": "The likeliest label issues: given -> suggested label (score).",
                "duplicates.png": "Duplicate pairs side by side, with their splits and hash distance."}


def _audit_section(audit: AuditFiles | None) -> str:
    """What `cnnkit audit RUN` found in the run's data: each table's size and first rows, and its sheets."""
    if audit is None:
        return ""
    blocks = ["<h2>Data audit</h2><p>From <code>cnnkit audit</code>, in the run's <code>audit/</code> folder.</p>"]
    for name, what in AUDIT_TABLES.items():
        table = audit.tables.get(name)
        if isinstance(table, str):
            blocks.append(f"<p><code>{_e(name)}</code>: {_e(table)}.</p>")
        elif table is not None:
            header, rows, count = table
            shown = f", the first {len(rows)}" if count > len(rows) else ""
            blocks.append(f"<p><code>{_e(name)}</code>: {count:,} {_e(what)}{shown}.</p>")
            if rows:
                blocks.append(_table(header, [row + [""] * (len(header) - len(row)) for row in rows],
                                     text_columns=len(header)))
    for name, data in audit.figures:
        if data.startswith(PNG_SIGNATURE):
            blocks.append(_figure(f"audit/{name}", data, AUDIT_SHEETS[name]))
    return "\n".join(blocks)


def _per_class_section(m: Metrics) -> str:
    per_class = m.test_report.per_class if m.test_report else {}
    if not per_class:
        return ""
    rows = [[name, _number(v.precision), _number(v.recall), _number(v.f1), _number(v.support)]
            for name, v in per_class.items()]
    return ("<h2>Per-class metrics (test set)</h2>"
            + _table(["class", "precision", "recall", "F1", "support"], rows))


def _history_section(history: HistoryTable | None, kept_epoch: int | None) -> str:
    if not history or not history.rows:
        return ""
    header = history.columns
    rows = [[_number(int(row[0]))] + [_number(value) for value in row[1:]] for row in history.rows]
    kept = [("kept" if row[0] == kept_epoch else "") for row in history.rows]
    note = " The highlighted row is the epoch whose weights were kept." if any(kept) else ""
    return (f"<h2>Epoch history</h2><p>From <code>history.csv</code>.{_e(note)}</p>"
            + _table(header, rows, text_columns=0, row_classes=kept))


def _facts_section(m: Metrics) -> str:
    """The remaining scalar entries of metrics.json (timings, sizes, device...), as recorded."""
    rows = [[key, _number(value)] for key, value in m.scalars().items()]
    if not rows:
        return ""
    return ("<h2>Run facts</h2><p>From <code>metrics.json</code>.</p>"
            + _table(["metric", "value"], rows, text_columns=2))


def _config_section(config: RunConfig) -> str:
    if not config.options:
        return ""
    rows = [[key, value if isinstance(value, str) else json.dumps(value)] for key, value in config.options.items()]
    return ("<h2>Configuration</h2><p>Every option, from <code>config.json</code> "
            "(<code>cnnkit train --config config.json</code> repeats the run).</p>"
            + _table(["option", "value"], rows, text_columns=2))


def _files_section(run_dir: Path) -> str:
    files = sorted(p for p in run_dir.iterdir() if _regular(p) and not p.name.startswith("."))
    rows = [[p.name, _size(p.stat().st_size)] for p in files if p.name != REPORT_FILE]
    return "<h2>Files in this run</h2>" + _table(["file", "size"], rows) if rows else ""


def _size(count: int) -> str:
    for unit in ("bytes", "KB", "MB"):
        if count < 1024 or unit == "MB":
            return f"{count:,} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _footer() -> str:
    return (f"<footer>Written by cnnkit {_e(__version__)} from the files in this run directory; "
            "rebuild it with <code>cnnkit report RUN</code>.</footer>")
