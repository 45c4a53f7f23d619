"""The README's Python API example runs as written (in a fresh folder beside the shared data)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from processes import run_cnnkit
from slices import SHARED_DATA

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_the_readme_python_api_example_runs_as_written(tmp_path):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)  # the README's ../shared/data
    result = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "225,034" in result.stdout and "History(2 epochs" in result.stdout and "EvalReport(accuracy=" in result.stdout
    assert (work / "runs" / "api" / "model.safetensors").is_file() and (work / "runs" / "api" / "metrics.json").is_file()


def tour_commands() -> list[list[str]]:
    import shlex

    text = README.read_text()
    section = text[text.index("## A short tour"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_tour_runs_in_order_as_written(tmp_path, http_mirror):
    """Every tour command, in order, in a fresh folder; downloads go to a local mirror, never the internet."""
    import os

    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "CNNKIT_MIRROR": http_mirror(SHARED_DATA).url,
           "COLUMNS": "200"}
    env.pop("CNNKIT_DATA", None)
    outputs = []
    for command in tour_commands():
        assert command[0] == "cnnkit"
        result = run_cnnkit(*command[1:], cwd=work, env=env, timeout=600)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        outputs.append(result.stdout)
    assert outputs[0].strip().splitlines()[-1] == "runs/tour"
    assert len(list((work / "digits").rglob("*.png"))) == 200
    predictions = [line.split("\t") for line in outputs[3].strip().splitlines()]
    correct = sum(Path(path).parent.name == label for path, label, *_ in predictions)
    assert len(predictions) == 200 and correct >= 180  # the tutorial's model, 1 epoch on 10,000 digits: 193 measured
    assert (work / "runs" / "tour" / "report.html").is_file() and (work / "runs" / "folder" / "model.json").is_file()
    assert (work / "runs" / "compare.png").is_file() and "│ tour " in outputs[-1] and "│ folder " in outputs[-1]
