"""report.html: built from a real run directory and from a hand-made one, checked by content."""

from __future__ import annotations

import base64
import io
import json
import shutil
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from cnnkit.errors import CnnkitError
from cnnkit.report import REPORT_FILE, run_name, read_run_files, wilson_interval, write_report
from processes import run_cnnkit
from slices import SHARED_DATA

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
VOID = {"meta", "img", "br", "hr", "link", "input"}


class _TagChecker(HTMLParser):
    """Fails on a closing tag that does not match the open one: the page must be well nested."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def _parse(page: str) -> _TagChecker:
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.stack == []
    return checker


def _assert_self_contained(page: str) -> None:
    for forbidden in ("http://", "https://", 'src="http', "<link", "<script", "@import", "url("):
        assert forbidden not in page, forbidden
    for tag, attrs in _parse(page).tags:
        for name in ("src", "href"):
            assert attrs.get(name) is None or attrs[name].startswith("data:image/png;base64,"), (tag, attrs)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """One real one-epoch `cnnkit train` on an MNIST slice, as a user would run it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    runs = tmp_path_factory.mktemp("runs")
    result = run_cnnkit("train", "--epochs", "1", "--limit-train", "1000", "--limit-eval", "300", "--data-dir",
                        str(SHARED_DATA), "--runs-dir", str(runs), "--quiet", timeout=300,
                        env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert (run_dir / "metrics.json").is_file()
    return run_dir


def test_report_of_a_real_run_embeds_every_png_and_needs_nothing_else(real_run):
    path = write_report(real_run)
    assert path == real_run / REPORT_FILE
    page = path.read_text(encoding="utf-8")
    _assert_self_contained(page)

    pngs = sorted(p for p in real_run.glob("*.png"))
    assert {p.name for p in pngs} >= {"history.png", "confusion_matrix.png", "errors.png"}
    embedded = [base64.b64decode(data) for data in DATA_URI.findall(page)]
    assert len(embedded) == len(pngs)
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)  # each file, byte for byte
    for data in embedded:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.width > 300
    for png in pngs:
        assert f"<code>{png.name}</code>" in page  # every figure has a caption naming it

    metrics = json.loads((real_run / "metrics.json").read_text())
    config = json.loads((real_run / "config.json").read_text())
    assert f"{100 * metrics['test_accuracy']:.2f}%" in page
    assert "95% interval" in page and "finite test set" in page
    assert f"Weights kept:</strong> epoch {metrics['selected']['epoch']} of 1" in page
    assert real_run.name in page and "seed" in page and "mnist" in page
    for option in config:
        assert f'<td class="text">{option}</td>' in page
    for name in metrics["test_report"]["per_class"]:
        assert f'<td class="text">{name}</td>' in page
    history_rows = re.search(r"<h2>Epoch history</h2>.*?<tbody>(.*?)</tbody>", page, re.S).group(1)
    assert history_rows.count("<tr") == metrics["epochs"] == 1
    assert not [p for p in real_run.iterdir() if p.name.startswith(".")]  # written atomically, no leftovers


def test_report_picks_up_any_new_png_and_is_rebuilt_in_place(real_run):
    with Image.open(real_run / "history.png") as image:
        image.crop((0, 0, 50, 40)).save(real_run / "zz_extra.png")
    try:
        page = write_report(real_run).read_text(encoding="utf-8")
        assert len(DATA_URI.findall(page)) == len(list(real_run.glob("*.png")))
        assert "<code>zz_extra.png</code>" in page
        assert page.index("history.png") < page.index("zz_extra.png")  # the known figures come first
    finally:
        (real_run / "zz_extra.png").unlink()


def test_building_the_report_imports_neither_torch_nor_matplotlib(real_run):
    code = ("import sys; from pathlib import Path; from cnnkit.report import write_report; "
            f"write_report(Path({str(real_run)!r})); "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules, 'numpy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False"]


# --- a hand-made run directory ---------------------------------------------------------------------------


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (40, 30), colour).save(path)


@pytest.fixture
def odd_run(tmp_path) -> Path:
    """A run whose class names and dataset path hold characters that HTML would take as markup."""
    run = tmp_path / "runs" / "odd<run>"
    run.mkdir(parents=True)
    classes = ["<b>&", "cat", 'say "hi"']
    (run / "config.json").write_text(json.dumps({
        "dataset": "imagefolder:/data/<script>alert(1)</script>&more", "model": "seed", "epochs": 3, "lr": 0.001,
        "model_kwargs": {"width": 8}, "name": None}))
    (run / "metrics.json").write_text(json.dumps({
        "test_accuracy": 0.85, "test_loss": 0.41, "num_test": 300, "epochs": 3, "model": "seed",
        "dataset": "imagefolder:/data/<script>alert(1)</script>&more", "test_accuracy_ci95": [0.8052, 0.886],
        "most_confused": [["<b>&", "cat", 7], ["cat", 'say "hi"', 2]],
        "selected": {"keep": "best", "epoch": 2, "weights": "ema", "monitor": "val_accuracy", "value": 0.86},
        "val_source": "held-out",
        "test_report": {"loss": 0.41, "accuracy": 0.85, "macro_f1": 0.84, "per_class": {
            name: {"precision": 0.8 + 0.05 * i, "recall": 0.9 - 0.05 * i, "f1": 0.84, "support": 100}
            for i, name in enumerate(classes)}, "confusion_matrix": [[90, 7, 3], [5, 93, 2], [10, 8, 82]]}}))
    (run / "model.json").write_text(json.dumps({
        "format": "cnnkit.model", "architecture": "seed", "classes": classes, "dataset": "imagefolder:photos",
        "input": {"channels": 1, "height": 28, "width": 28}, "preprocessing": {"mean": [0.1], "std": [0.3]}}))
    (run / "history.csv").write_text(
        "epoch,loss,accuracy,val_loss,val_accuracy,lr,seconds,ema_val_loss,ema_val_accuracy\n"
        "1,0.9,0.7,0.8,0.75,0.001,1.5,nan,nan\n2,0.5,0.82,0.45,0.84,0.001,1.4,0.44,0.86\n"
        "3,0.4,0.86,0.47,0.83,0.001,1.4,0.45,0.85\n")
    _png(run / "history.png", (200, 10, 10))
    _png(run / "per_class.png", (10, 200, 10))
    (run / "broken.png").write_bytes(b"not a png at all")
    return run


def test_every_text_from_the_files_is_escaped(odd_run):
    page = write_report(odd_run).read_text(encoding="utf-8")
    _assert_self_contained(page)
    assert "<b>&" not in page and "&lt;b&gt;&amp;" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;more" in page
    assert "odd<run>" not in page and "<h1>odd&lt;run&gt;</h1>" in page
    assert "say &quot;hi&quot;" in page
    assert "&lt;b&gt;&amp; → cat: 7 images" in page


def test_a_hand_made_run_shows_interval_kept_epoch_history_and_only_real_pngs(odd_run):
    page = write_report(odd_run).read_text(encoding="utf-8")
    assert "85.00%</span> test accuracy" in page
    assert "95% interval 80.5% – 88.6%" in page and "300 test images" in page and "finite test set" in page
    assert "computed here" not in page  # the recorded interval is used as is
    assert "Weights kept:</strong> epoch 2 of 3 (keep = best; val_accuracy = 0.86; ema weights)" in page
    assert '<tr class="kept"><td>2</td>' in page  # the kept epoch's history row is highlighted
    assert "<td>–</td>" in page  # NaN (no EMA yet at epoch 1) shown as a dash
    assert len(DATA_URI.findall(page)) == 2 and "broken.png: not a valid PNG file" in page
    assert page.index("<code>history.png</code>") < page.index("<code>per_class.png</code>")
    assert '<td class="text">model_kwargs</td><td class="text">{&quot;width&quot;: 8}</td>' in page


def test_a_run_without_the_new_metrics_still_reports_an_interval(odd_run):
    metrics = json.loads((odd_run / "metrics.json").read_text())
    for key in ("test_accuracy_ci95", "most_confused", "selected"):
        del metrics[key]
    (odd_run / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(odd_run).read_text(encoding="utf-8")
    low, high = wilson_interval(0.85, 300)
    assert f"95% interval {100 * low:.1f}% – {100 * high:.1f}%" in page and "computed here" in page
    assert "&lt;b&gt;&amp; → cat: 7 images" in page  # the top confusion, read off the matrix
    assert "Weights kept:</strong> those of the last epoch (3)" in page


def test_wilson_interval_matches_the_textbook_value():
    assert wilson_interval(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # 5 of 10
    assert wilson_interval(0.85, 300) == pytest.approx((0.8052, 0.8860), abs=1e-4)
    low, high = wilson_interval(1.0, 300)  # all right: the interval still admits some errors
    assert high == pytest.approx(1.0) and low == pytest.approx(0.9874, abs=1e-4)


def test_a_staging_directory_reports_the_intended_name(tmp_path):
    staging = tmp_path / ".train.partial-x1y2"
    staging.mkdir()
    (staging / "config.json").write_text(json.dumps({"name": None, "model": "seed", "dataset": "mnist"}))
    assert run_name(read_run_files(staging)) is None  # train, train2...: not known until committed
    assert "<h1>seed on mnist</h1>" in write_report(staging).read_text(encoding="utf-8")
    (staging / "config.json").write_text(json.dumps({"name": "mine"}))
    assert run_name(read_run_files(staging)) == "mine"
    assert "<h1>mine</h1>" in write_report(staging).read_text(encoding="utf-8")


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(CnnkitError, match="not a cnnkit run directory"):
        write_report(tmp_path)
    with pytest.raises(CnnkitError, match="no such run directory"):
        write_report(tmp_path / "missing")
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(CnnkitError, match="metrics.json: not valid JSON"):
        write_report(tmp_path)


def test_an_audit_folder_is_shown_and_a_damaged_one_is_named_not_fatal(odd_run):
    audit = odd_run / "audit"
    audit.mkdir()
    (audit / "label_issues.csv").write_text("file,given,suggested,score\n" +
                                           "".join(f"train/cat/{i}.png,cat,<b>dog,0.9{i}\n" for i in range(12)))
    (audit / "duplicates.csv").write_bytes(b"file_a,file_b\n\xff\xfe\n")
    page = write_report(odd_run).read_text(encoding="utf-8")
    assert "<h2>Data audit</h2>" in page and "12 likely label issues (most likely first), the first 10" in page
    assert "&lt;b&gt;dog" in page and "<b>dog" not in page  # the CSV's text is escaped like every other
    assert "duplicates.csv</code>: not readable (not UTF-8 text (byte 14)" in page
    shutil.rmtree(audit)
    assert "Data audit" not in write_report(odd_run).read_text(encoding="utf-8")
