"""The promise at every edge (issue 19), through real processes: nothing overwritten, nothing executed, no hang,
no traceback, nothing left behind.

Each case is a real `python -m cnnkit` process (or the real server over HTTP), with real links, devices, FIFOs,
a real fake `gs` on PATH that records being run, real signals and a real tmpfs. The cases are grouped by the
mechanism that covers them (fileio's one reader and one writer, data.images' one image policy, the code trust
of models/user.py, text.py's escaping, the server's timeouts); many run concurrently, as they are independent.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from processes import start_cnnkit
from slices import SHARED_DATA
from test_hostile_inputs import cnnkit, everything_under, one_error_line, write_digit_pngs

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason=f"no MNIST files in {SHARED_DATA}")

TRAIN_SMALL = ["--data-dir", str(SHARED_DATA), "--epochs", "1", "--limit-train", "256", "--limit-eval", "128",
               "--quiet", "--no-checkpoint"]
#: A stand-in for Ghostscript: Pillow's EPS plugin runs `gs` from PATH. It records that it ran and fails.
FAKE_GS = "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/gs-was-run\"\nexit 1\n"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 0 0 moveto 28 28 lineto stroke\nshowpage\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edges")


@pytest.fixture(scope="module")
def trained(root) -> Path:
    """A real trained MNIST run (1 epoch on 256 images): weights, metrics.json, history.csv, figures, report."""
    result = cnnkit("train", *TRAIN_SMALL, "--runs-dir", str(root / "runs"), "--name", "r")
    assert result.returncode == 0, result.stderr
    return root / "runs" / "r"


@pytest.fixture(scope="module")
def fake_gs(root) -> tuple[dict, Path]:
    """(an environment whose PATH finds the fake gs first, the file it writes when run)."""
    folder = root / "bin"
    folder.mkdir()
    (folder / "gs").write_text(FAKE_GS)
    (folder / "gs").chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}, folder / "gs-was-run"


@dataclass
class Case:
    """One command and what a user must see: a one-line error containing `error` (or success when None)."""

    args: list[str]
    error: str | None
    env: dict | None = None
    timeout: float = 120
    result: subprocess.CompletedProcess | None = field(default=None, repr=False)


def run_all(cases: list[Case]) -> None:
    """Run independent cases two at a time, then check each: one stderr line naming the problem, or success."""
    with ThreadPoolExecutor(2) as pool:
        for case, result in zip(cases, pool.map(lambda c: cnnkit(*c.args, env=c.env, timeout=c.timeout), cases)):
            case.result = result
    for case in cases:
        if case.error is None:
            assert case.result.returncode == 0, (case.args, case.result.stderr)
            assert "Traceback" not in case.result.stderr, case.result.stderr
        else:
            assert case.error in one_error_line(case.result), (case.args, case.result.stderr)


def digest(path: Path) -> bytes:
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# The one writer: nothing that is not the command's own is replaced


def test_no_command_writes_over_another_runs_files_a_link_or_a_device(trained, root, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    digit = write_digit_pngs(tmp_path / "digits", 1)[0]
    weights, other_weights = digest(trained / "model.safetensors"), digest(other / "model.safetensors")
    (tmp_path / "stdout-link").symlink_to("/proc/self/fd/1")
    (tmp_path / "stdout.png").symlink_to("/proc/self/fd/1")
    device = tmp_path / "null-device"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a character device, as /dev/null is
    (tmp_path / "folder.csv").mkdir()
    cases = [
        Case(["export", str(trained), "--format", "onnx", "--out", str(other / "model.safetensors")],
             "is a file of the run in"),
        Case(["predict", str(trained), str(digit), "--csv", str(trained / "model.safetensors")], "is a file of the run"),
        Case(["predict", str(trained), str(digit), "--csv", str(tmp_path / "stdout-link")], "is a link"),
        Case(["predict", str(trained), str(digit), "--csv", str(device)], "is a character device"),
        Case(["predict", str(trained), str(digit), "--csv", str(tmp_path / "folder.csv")], "is a folder"),
        Case(["predict", str(trained), str(digit), "--show-input", str(other)], "is a run directory"),
        Case(["compare", str(trained), "--out", str(tmp_path / "stdout.png")], "is a link"),
    ]
    run_all(cases)
    assert digest(trained / "model.safetensors") == weights and digest(other / "model.safetensors") == other_weights
    assert (tmp_path / "stdout-link").is_symlink() and os.readlink(tmp_path / "stdout-link") == "/proc/self/fd/1"
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in trained.iterdir())


def test_a_file_name_that_is_not_utf8_is_predicted_and_written_to_the_csv(trained, tmp_path):
    folder = tmp_path / "photos"
    digits = write_digit_pngs(folder, 3)
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9.png")  # Latin-1 bytes: not UTF-8
    os.rename(digits[0], odd)
    out = tmp_path / "predictions.csv"
    result = cnnkit("predict", str(trained), str(folder), "--csv", str(out))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    rows = out.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 4 and any(row.startswith(f"{folder}/caf\\xe9.png,") for row in rows), rows
    assert "caf\\xe9.png" in result.stdout  # the TSV shows the byte, not a traceback


def test_tilde_is_expanded_the_same_way_for_every_path_and_an_unknown_user_is_one_line(trained, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    digit = write_digit_pngs(tmp_path / "digits", 1)[0]
    cases = [
        Case(["train", *TRAIN_SMALL, "--runs-dir", "~/runs", "--name", "t"], None, env),
        Case(["predict", str(trained), str(digit), "--csv", "~/p.csv"], None, env),
        Case(["train", *TRAIN_SMALL, "--runs-dir", "~nosuchuser9/runs"], "no user named 'nosuchuser9'", env),
        Case(["train", *TRAIN_SMALL[2:], "--data-dir", "~nosuchuser9/data"], "no user named 'nosuchuser9'", env),
        Case(["predict", str(trained), str(digit), "--csv", "~nosuchuser9/p.csv"], "no user named 'nosuchuser9'", env),
        Case(["train", *TRAIN_SMALL[2:]], "no user named 'nosuchuser9'", {**env, "CNNKIT_DATA": "~nosuchuser9/d"}),
    ]
    run_all(cases)
    assert (home / "runs" / "t" / "model.safetensors").is_file() and (home / "p.csv").is_file()
    assert not list(Path.cwd().glob("~*")) and not (tmp_path / "~").exists()


def test_a_killed_exports_temporary_file_is_swept_by_the_next_export(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    stale = run / ".model.torchscript.pt.k1ll3dxx.tmp"  # as atomic_path names it; no live process holds its lock
    stale.write_bytes(b"half an archive")
    result = cnnkit("export", str(run), "--format", "torchscript", "--parity-images", "8")
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and (run / "model.torchscript.pt").is_file()


def test_torchscript_export_on_a_full_disk_is_one_line_and_leaves_nothing(trained, mount_tmpfs):
    disk = mount_tmpfs("disk", "64k")
    result = cnnkit("export", str(trained), "--format", "torchscript", "--parity-images", "8",
                    "--out", str(disk / "model.pt"))
    assert result.returncode == 1  # not 134: the C++ abort of torch.jit.save on a full disk
    assert "No space left on device" in one_error_line(result)
    assert everything_under(disk) == []


def test_sigterm_during_predict_show_input_removes_the_pictures_it_wrote(trained, tmp_path):
    digits = write_digit_pngs(tmp_path / "many", 3000)
    shown = tmp_path / "seen"
    process = start_cnnkit("predict", str(trained), str(digits[0].parent), "--show-input", str(shown),
                           stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (shown.is_dir() and any(shown.iterdir())) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "predict ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == -signal.SIGINT and "nothing was saved" in stderr, stderr  # SIGTERM ends as Ctrl-C
    assert not shown.exists()  # the folder it made, and every picture in it, gone


# ---------------------------------------------------------------------------------------------------------
# The one image policy: nothing runs an external program


def test_an_eps_file_named_png_runs_no_program_in_predict_or_training(trained, tmp_path, fake_gs):
    env, ran = fake_gs
    photos = tmp_path / "photos"
    write_digit_pngs(photos, 2)
    (photos / "x.png").write_bytes(EPS)
    result = cnnkit("predict", str(trained), str(photos), env=env)
    assert result.returncode == 1 and "x.png: not a readable image" in one_error_line(result)
    folder = tmp_path / "folder"
    for label in range(3):
        write_digit_pngs(folder / f"c{label}", 12, seed=label)
    (folder / "c1" / "y.png").write_bytes(EPS)
    trained_folder = cnnkit("train", "--dataset", f"imagefolder:{folder}", "--epochs", "1", "--quiet",
                            "--no-checkpoint", "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "d"),
                            env=env)
    assert trained_folder.returncode == 0, trained_folder.stderr
    assert "c1/y.png" in trained_folder.stderr  # skipped, and said so even with --quiet
    assert not ran.exists(), ran.read_text()


#: A one-pixel TIFF whose StripOffsets (tag 0x111) is a RATIONAL: Pillow raises TypeError while decoding it
#: (found by the server's property test: a 500 before every image reader caught data.images.DECODE_ERRORS).
RATIONAL_TIFF = bytes.fromhex(
    "49492a000800000009000001040001000000010000000101040001000000080000000201030001000000080000000301"
    "0300010000000100000006010300010000000100000011010500010000007a0000001601040001000000080000001701"
    "040001000000080000001c0103000100000001000000000000007fcaa1bbd7659d54")


def test_an_image_whose_decoder_raises_type_error_is_one_line_in_predict(trained, tmp_path):
    (tmp_path / "odd.tif").write_bytes(RATIONAL_TIFF)
    result = cnnkit("predict", str(trained), str(tmp_path / "odd.tif"))
    assert result.returncode == 1 and "odd.tif: not a readable image (TypeError" in one_error_line(result)


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(trained, tmp_path):
    big = tmp_path / "big16.png"
    Image.fromarray(np.full((3000, 3000), 40000, np.uint16)).save(big)  # 16-bit, 9 MP, a few kB
    refused = cnnkit("predict", str(trained), str(big), "--max-megapixels", "8")
    assert "over the cap of 8" in one_error_line(refused)
    allowed = cnnkit("predict", str(trained), str(big))
    assert allowed.returncode == 0, allowed.stderr


def test_the_folder_cache_follows_the_pixel_cap(tmp_path):
    """An image refused under one --max-megapixels is decoded under a larger one: the cap is part of the cache
    key, so a cached folder made under another cap is not reused."""
    folder = tmp_path / "folder"
    for label in range(3):
        write_digit_pngs(folder / f"c{label}", 12, seed=label)
    Image.fromarray(np.full((3000, 3000), 200, np.uint8)).save(folder / "c0" / "big.png")  # 9 MP
    common = ["train", "--dataset", f"imagefolder:{folder}", "--epochs", "1", "--quiet", "--no-checkpoint",
              "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "d")]
    capped = cnnkit(*common, "--max-megapixels", "8", "--name", "capped")
    assert capped.returncode == 0 and "c0/big.png (3000x3000 is 9.0 megapixels, over the cap of 8)" in capped.stderr
    assert "raise the pixel cap with --max-megapixels" in capped.stderr, capped.stderr  # the reason and the fix
    uncapped = cnnkit(*common, "--name", "uncapped")
    assert uncapped.returncode == 0 and "big.png" not in uncapped.stderr, uncapped.stderr
    counts = [json.loads((tmp_path / "runs" / name / "metrics.json").read_text()) for name in ("capped", "uncapped")]
    assert sum(run["num_train"] + run["num_val"] + run["num_test"] for run in counts[1:]) == \
        sum(run["num_train"] + run["num_val"] + run["num_test"] for run in counts[:1]) + 1


# ---------------------------------------------------------------------------------------------------------
# The one reader: no unbounded read, no hang, no traceback from a hand-edited file


def test_config_files_that_never_end_nest_too_deep_or_hold_huge_numbers_are_one_line(tmp_path):
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    (tmp_path / "deep.json").write_text('{"epochs": ' + "[" * 5000 + "]" * 5000 + "}")
    (tmp_path / "deep.toml").write_text("epochs = " + "[" * 3000 + "]" * 3000 + "\n")
    (tmp_path / "huge.json").write_text('{"epochs": ' + "9" * 5000 + "}")
    (tmp_path / "nul.json").write_text('{"dataset": "imagefolder:/tmp/a\\u0000b"}')
    cases = [
        Case(["train", "--config", "/dev/zero"], "a character device, not a regular file", timeout=30),
        Case(["train", "--config", str(fifo)], "a FIFO, not a regular file", timeout=30),
        Case(["train", "--config", str(tmp_path / "deep.json")], "nested too deeply"),
        Case(["train", "--config", str(tmp_path / "deep.toml")], "nested too deeply"),
        Case(["train", "--config", str(tmp_path / "huge.json")], "an integer of 5000 digits"),
        Case(["train", "--config", str(tmp_path / "nul.json")], "cannot hold a NUL character"),
    ]
    run_all(cases)


def test_runs_and_compare_survive_run_files_that_are_devices_fifos_or_garbage(trained, tmp_path):
    runs = tmp_path / "runs"
    for name in ("zero", "fifo", "latin1"):
        shutil.copytree(trained, runs / name)
    (runs / "zero" / "metrics.json").unlink()
    (runs / "zero" / "metrics.json").symlink_to("/dev/zero")
    (runs / "fifo" / "config.json").unlink()
    os.mkfifo(runs / "fifo" / "config.json")
    (runs / "latin1" / "history.csv").write_bytes(b"epoch,val_accuracy\n1,0.5\xff\n")
    listed = cnnkit("runs", str(runs), timeout=60)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert "metrics.json: a character device" in listed.stdout and "config.json: a FIFO" in listed.stdout
    compared = cnnkit("compare", *(str(runs / name) for name in ("zero", "fifo", "latin1")),
                      "--out", str(tmp_path / "c.png"), timeout=60)
    assert compared.returncode == 0 and "Traceback" not in compared.stderr, compared.stderr
    assert "history.csv: not UTF-8 text" in compared.stdout
    (runs / "fifo" / "model.safetensors").unlink()
    os.mkfifo(runs / "fifo" / "model.safetensors")  # safetensors opens it itself: checked before it may
    digit = write_digit_pngs(tmp_path / "digit", 1)[0]
    assert "a FIFO, not a regular file" in one_error_line(cnnkit("predict", str(runs / "fifo"), str(digit), timeout=60))


@pytest.mark.parametrize("edit, error", [
    (lambda m: m.update(test_accuracy="high"), "metrics.json: test_accuracy"),
    (lambda m: m.update(test_accuracy=1.5), "metrics.json: test_accuracy"),
    (lambda m: m.update(selected=[1, 2]), "metrics.json: selected"),
    (lambda m: m.update(most_confused=[["1", "2"]]), "metrics.json: most_confused.0"),
    (lambda m: m["test_report"].update(confusion_matrix=[[1, 2], [3]]), "confusion_matrix must be square"),
])
def test_report_on_a_hand_edited_metrics_json_is_one_line_naming_the_field(trained, tmp_path, edit, error):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    metrics = json.loads((run / "metrics.json").read_text())
    edit(metrics)
    (run / "metrics.json").write_text(json.dumps(metrics))
    before = digest(run / "report.html")
    assert error in one_error_line(cnnkit("report", str(run)))
    assert digest(run / "report.html") == before


def test_report_embeds_no_png_link_that_points_outside_the_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((9, 9), 7, np.uint8)).save(secret)
    (run / "holiday.png").symlink_to(secret)
    result = cnnkit("report", str(run))
    assert result.returncode == 0, result.stderr
    page = (run / "report.html").read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in page and "holiday.png" not in page


# ---------------------------------------------------------------------------------------------------------
# Resuming: the checkpoint is checked where it is read, the model's code where it is run

USER_MODEL = '''
import torch
from torch import nn

def build(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes))
'''


@pytest.fixture(scope="module")
def interrupted(root) -> dict[str, Path]:
    """Two unfinished runs, each stopped after epoch 1 of 3: one of a registry model, one of a FILE.py model."""
    from checkpoints import StopAfter
    import cnnkit as api

    code = root / "mynet.py"
    code.write_text(USER_MODEL)
    made = {}
    for name, model in (("seed", "seed"), ("file", f"{code}:build")):
        with pytest.raises(api.CnnkitError, match="training interrupted"):  # RunInterrupted: the checkpoint kept
            api.train(dataset="mnist", data_dir=str(SHARED_DATA), model=model, epochs=3, limit_train=256,
                      limit_eval=128, runs_dir=str(root / "unfinished"), name=name, progress=False,
                      log=lambda *a, **k: None, callbacks=[StopAfter(1)])
        (made[name],) = (root / "unfinished").glob(f".{name}.partial-*")
    made["code"] = code
    return made


def edited_copy(staging: Path, target: Path, edit) -> Path:
    shutil.copytree(staging, target)
    document = json.loads((target / "checkpoint.json").read_text())
    edit(document["state"])
    (target / "checkpoint.json").write_text(json.dumps(document))
    return target


def test_a_hand_edited_checkpoint_is_one_line_and_never_saved_as_a_run(interrupted, tmp_path):
    staging = interrupted["seed"]
    model = json.loads((staging / "checkpoint.json").read_text())["state"]["model"]
    weight, bias = (next(key for key in model if key.endswith(end)) for end in ("weight", "bias"))
    edits = {
        "missing": (lambda s: s.pop("optimizer"), "its state lacks 'optimizer'"),
        "type": (lambda s: s.update(stop_training="no"), "its state's 'stop_training' is str"),
        "negative": (lambda s: s.update(epoch=-3), "is not a completed epoch"),
        "beyond": (lambda s: (s.update(epoch=100, step=800), s["callbacks"]["History"].update(
            epoch=list(range(1, 101)), history={})), "beyond the 3 epochs"),
        "shape": (lambda s: s["model"].update({weight: s["model"][bias]}), "does not fit this run's model"),
    }
    cases = []
    for name, (edit, error) in edits.items():
        # A runs folder each: every copy is a run named "seed", and two resumes of one name at once would be
        # refused for that ("the name is taken") before reaching the edit under test.
        copy = edited_copy(staging, tmp_path / name / f".{name}.partial-x{name}", edit)
        cases.append(Case(["train", "--resume", str(copy)], error))
    run_all(cases)
    for name in edits:  # each copy left as it was: nothing renamed into a run, nothing added beside it
        assert [p.name for p in (tmp_path / name).iterdir()] == [f".{name}.partial-x{name}"]


def test_resuming_a_file_model_needs_trust_and_the_very_file_it_started_with(interrupted, tmp_path):
    staging = tmp_path / ".file.partial-copy"
    shutil.copytree(interrupted["file"], staging)
    code = interrupted["code"]
    untrusted = cnnkit("train", "--resume", str(staging))
    assert "add --trust-code" in one_error_line(untrusted)
    original = code.read_text()
    code.write_text(original.replace("nn.Flatten(), ", "nn.Flatten(), nn.Tanh(), "))  # the same tensor shapes
    try:
        edited = cnnkit("train", "--resume", str(staging), "--trust-code")
        assert "has changed since" in one_error_line(edited)
    finally:
        code.write_text(original)
    resumed = cnnkit("train", "--resume", str(staging), "--trust-code", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "file" / "metrics.json").read_text())["epochs"] == 3


# ---------------------------------------------------------------------------------------------------------
# Users' networks, folders and names

BAD_MODELS = {
    "raises": ("def build(s, n):\n    return Net()\nclass Net(nn.Module):\n    def __init__(self):\n"
               "        super().__init__(); self.l = nn.Linear(2, 2)\n    def forward(self, x):\n"
               "        raise ValueError('no')\n", "forward pass on a batch of shape (2, 1, 28, 28) raised ValueError"),
    "empty": ("def build(s, n):\n    return nn.Flatten()\n", "no trainable parameters"),
    "logits": ("def build(s, n):\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, n + 1))\n",
               "returned shape (2, 11)"),
    "exits": ("import sys\ndef build(s, n):\n    return nn.Linear(1, 1)\nsys.exit(0)\n", "SystemExit"),
}


def test_a_user_network_that_cannot_train_is_one_line_before_any_training(tmp_path):
    cases = []
    for name, (body, error) in BAD_MODELS.items():
        (tmp_path / f"{name}.py").write_text("from torch import nn\n" + body)
        cases.append(Case(["train", *TRAIN_SMALL, "--model", f"{tmp_path / name}.py:build",
                           "--runs-dir", str(tmp_path / "runs")], error))
    run_all(cases)
    assert everything_under(tmp_path / "runs") == []


def test_folders_whose_classes_would_share_or_lack_images_are_refused(tmp_path):
    base = tmp_path / "base"
    for label in range(3):
        write_digit_pngs(base / f"c{label}", 8, seed=label)
    layouts = {"parent": lambda f: (f / "c9").symlink_to(".."), "loop": lambda f: (f / "c9").symlink_to("c9"),
               "twice": lambda f: (f / "c9").symlink_to("c1"),
               "undecodable": lambda f: ((f / "c9").mkdir(), (f / "c9" / "a.png").write_bytes(b"not a png"))}
    cases = []
    for name, make in layouts.items():
        shutil.copytree(base, tmp_path / name, symlinks=True)
        make(tmp_path / name)
        cases.append(Case(["train", "--dataset", f"imagefolder:{tmp_path / name}", "--epochs", "1", "--quiet",
                           "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "d")],
                          {"parent": "which holds the other classes' images", "loop": "a symlink loop",
                           "twice": "the same folder as class 'c1'", "undecodable": "no training image of class(es) c9"}
                          [name]))
    cases.append(Case(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "empty"), "--quiet"],
                      "ftp:// is not supported", {**os.environ, "CNNKIT_MIRROR": "ftp://127.0.0.1/x"}))
    run_all(cases)
    assert everything_under(tmp_path / "runs") == []


def test_names_with_escapes_markup_and_odd_bytes_reach_the_terminal_escaped(trained, tmp_path):
    folder = tmp_path / "folder"
    names = ["plain", "esc\x1b[31mred", "[red]markup"]
    for label, name in enumerate(names):
        write_digit_pngs(folder / name, 10, seed=label)
    os.rename(next((folder / "plain").iterdir()), os.fsdecode(bytes(folder / "plain") + b"/odd\xff.png"))
    result = cnnkit("train", "--dataset", f"imagefolder:{folder}", "--epochs", "1", "--quiet", "--no-checkpoint",
                    "--runs-dir", str(tmp_path / "["), "--name", "]", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b[31mred" in result.stdout
    run = tmp_path / "[" / "]"  # the path ends in [/], a closing tag to rich
    evaluated = cnnkit("evaluate", str(run), env={**os.environ, "COLUMNS": "200"})
    assert evaluated.returncode == 0 and "[red]markup" in evaluated.stdout, evaluated.stderr
    assert "[/]: test accuracy" in evaluated.stdout  # shown, not taken for markup (MarkupError before)
    predicted = cnnkit("predict", str(run), str(folder / "plain"))
    assert predicted.returncode == 0 and "\x1b" not in predicted.stdout and "odd\\xff.png" in predicted.stdout
    assert all(len(line.split("\t")) == 3 for line in predicted.stdout.splitlines())


# ---------------------------------------------------------------------------------------------------------
# The server


#: The served run's --stall-timeout (seconds): short, so the stalled clients below are dropped soon.
STALL_S = 2.0


@pytest.fixture(scope="module")
def server(trained, root):
    """`cnnkit serve` of a run whose metrics.json holds NaN, on a free port; (base URL, process)."""
    run = root / "served"
    shutil.copytree(trained, run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["test_loss"] = float("nan")
    (run / "metrics.json").write_text(json.dumps(metrics))
    port, process = start_server(run, "--stall-timeout", str(STALL_S))
    yield f"http://127.0.0.1:{port}", port, process
    if process.poll() is None:
        process.kill()
        process.wait()


def start_server(run: Path, *options: str) -> tuple[int, subprocess.Popen]:
    """`cnnkit serve RUN` on a free port of 127.0.0.1, once it says it is serving: (port, process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = start_cnnkit("serve", str(run), "--port", str(port), *options)
    assert "serving" in process.stdout.readline()
    return port, process


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    call = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def strict_json(data: bytes):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(data, parse_constant=refuse)


def test_an_upload_whose_decoder_raises_type_error_is_a_400(server):
    url, _, process = server
    status, body = request(url + "/predict", "POST", RATIONAL_TIFF, {"Content-Type": "image/tiff"})
    assert status == 400 and "corrupt or truncated" in json.loads(body)["detail"], body
    assert process.poll() is None


def test_the_server_answers_bad_requests_quietly_and_drops_stalled_clients(server, tmp_path):
    url, port, process = server
    assert request(url + "/", "HEAD")[0] == 200 and request(url + "/model", "HEAD")[0] == 200
    status, body = request(url + "/model")
    assert status == 200 and strict_json(body)["metrics"]["test_loss"] is None  # NaN: the page's parser fails
    deep = b'{"image": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    assert request(url + "/predict", "POST", deep, {"Content-Type": "application/json"})[0] == 400
    # A client that leaves mid-upload: no traceback in the server's log.
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                       b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                       b"filename=\"a.png\"\r\n\r\n" + b"a" * 500)
        time.sleep(0.5)
    # Half a request head, and half a body (at the same time): both closed by the server once they have sent
    # nothing for --stall-timeout seconds, not left open.
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    started = time.monotonic()
    stalled[0].sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    stalled[1].sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 900\r\n\r\n\x89P")
    for client in stalled:
        with client:
            client.settimeout(30)
            assert client.recv(100) == b""
    assert STALL_S - 0.1 < time.monotonic() - started < STALL_S + 10
    assert request(url + "/health")[0] == 200
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr


def test_sigterm_lets_the_requests_in_flight_finish(trained, tmp_path):
    port, process = start_server(trained)
    pixels = np.zeros((5000, 5000, 3), np.uint8)
    pixels[::7] = 255  # 25 MP, ~0.3 s each to decode here: requests queue on the pixel budget
    path = tmp_path / "big.png"
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    answers: list = []

    def post():
        answers.append(request(f"http://127.0.0.1:{port}/predict", "POST", data, {"Content-Type": "image/png"})[0])

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    _, stderr = process.communicate(timeout=30)
    assert answers == [200] * 6, (answers, stderr)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr


# ---------------------------------------------------------------------------------------------------------
# Out of memory (a ulimit, a container's limit) is the machine's, not a bug: one line naming what asks for less


def vm_data_after(code: str) -> int:
    """VmData (what RLIMIT_DATA counts) of a fresh Python after running `code`, in bytes."""
    report = "print(next(l for l in open('/proc/self/status') if l.startswith('VmData')).split()[1])"
    return 1024 * int(subprocess.run([sys.executable, "-c", f"{code}\n{report}"], capture_output=True, text=True,
                                     check=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc/self/status are Linux's")
def test_running_out_of_memory_is_one_line_and_leaves_no_run(tmp_path):
    import resource

    # A cap three quarters of the way from what the command line needs to what loading torch needs: torch's
    # import, inside the command, is what runs out. (Much nearer the command line's own needs, OpenBLAS and glibc
    # abort from C when they start their threads, before Python can say anything: measured below 0.45 of the way.)
    light = vm_data_after("import numpy, cnnkit.cli")
    heavy = vm_data_after("import numpy, cnnkit.cli, torch")
    cap = light + 3 * (heavy - light) // 4
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-m", "cnnkit", "train", "--data-dir", str(SHARED_DATA), "--runs-dir",
                             str(runs), "--epochs", "1", "--limit-train", "500", "--no-checkpoint"],
                            capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (cap, cap)))
    assert one_error_line(result).startswith("cnnkit: error: out of memory; ask for less at a time"), \
        (light, heavy, result.stderr[-2000:])
    assert everything_under(runs) == []
