"""Command line: parses arguments and calls the same functions the Python API exposes.

Only argparse and the standard library are imported at start-up, so `cnnkit --help` answers at once;
torch, plotting and data code are imported inside the command that needs them.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import NoReturn

from cnnkit.errors import INTERRUPTED, CnnkitError, describe_os_error
from cnnkit.fileio import locked_temp_file, output_path, sweep_stale_temp_files
from cnnkit.lifetime import BROKEN_PIPE, end_process
from cnnkit.text import markup, printable
from cnnkit.config import (FIELD_NAMES, LazyChoices, base_type, cli_flag, default_of, field_types, list_presets,
                           resolve_config, schema)
from cnnkit import __version__
from cnnkit.data.registry import DATASETS, get_spec, image_folder

PROG = "cnnkit"
OUT_OF_MEMORY = ("out of memory; ask for less at a time (--batch-size, --eval-batch-size; --stream yes for an image "
                 "folder; --limit for an audit) or free memory")
DEBUG_ENV = "CNNKIT_DEBUG"


class _Parser(argparse.ArgumentParser):
    """argparse, with prefix abbreviations off and a "did you mean" for a misspelled flag or choice."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line, as every other refusal (argparse prints its usage lines first), with where to look."""
        hint = _suggestion(message, self) or \
            f" (`{self.prog} --help` lists {'the commands' if self.prog == PROG else 'its options'})"
        self.exit(2, f"{self.prog}: error: {one_line(message + hint)}\n")


def _suggestion(message: str, parser: argparse.ArgumentParser) -> str:
    """' (did you mean --epochs?)' for the closest flag or choice to the one argparse rejected, or ''."""
    import difflib
    import re

    if match := re.search(r"unrecognized arguments: (\S+)", message):
        word, known = match[1].split("=")[0], [o for a in parser._actions for o in a.option_strings]
    elif match := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
        word, known = match[1], re.findall(r"'([^']*)'", match[2]) or match[2].split(", ")
    else:
        return ""
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _command(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                            formatter_class=_formatter)
    parser.set_defaults(parser=parser)
    _add_debug(parser, default=argparse.SUPPRESS)  # SUPPRESS: `cnnkit --debug train` is not undone here
    return parser


def _add_debug(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the Python traceback of an error, for a bug report (also: {DEBUG_ENV}=1)")


def _add_pixel_cap(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-megapixels", metavar="MP", type=_megapixels,
                        help="refuse images over this many megapixels, from their header (default: 64)")


def _megapixels(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of megapixels, got {text!r}") from None
    if not 0.001 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be from 0.001 to 1000 megapixels, got {text}")
    return value


def _apply_pixel_cap(args: argparse.Namespace) -> None:
    """The image policy's cap for this process, when the command has the option and it was given."""
    if getattr(args, "max_megapixels", None) is not None:
        from cnnkit.data.images import set_max_pixels

        set_max_pixels(round(args.max_megapixels * 1e6))


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR",
                        help="where datasets live / are downloaded (default: $CNNKIT_DATA or ~/.cache/cnnkit)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


#: Columns for a table printed into a pipe or file: rich would wrap and cut it at 80, which no terminal set.
PIPE_WIDTH = 240


def table_console():
    """A rich console for stdout: the terminal's width, or PIPE_WIDTH when stdout is a pipe or a file (tables are
    as wide as their content, never padded to it) unless COLUMNS says otherwise."""
    from rich.console import Console

    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(width=PIPE_WIDTH) if piped else Console()


def _cli_type(parse):
    """An argparse type from a schema parser: its ValueError becomes argparse's one-line usage error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def _default_text(value) -> str | None:
    """How --help shows a schema default; None where the help text already says what happens by default."""
    if value is None or value == {}:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


#: How `cnnkit train --help` groups the schema's options: the few most runs set first, then by subject.
#: Every option is in exactly one group (tests/test_cli.py checks it, so a new option gets a place).
OPTION_GROUPS = {
    "the usual options": ("preset", "dataset", "model", "epochs", "batch_size", "lr", "seed", "name"),
    "data": ("data_dir", "val", "image_size", "channels", "stream", "limit_train", "limit_eval", "sampler"),
    "model and starting weights": ("model_kwargs", "pretrained", "freeze", "probe_epochs", "freeze_epochs",
                                   "freeze_stages", "freeze_bn", "backbone_lr_scale", "stage_lr_decay", "init",
                                   "weights"),
    "optimisation": ("optimizer", "weight_decay", "schedule", "warmup", "label_smoothing", "class_weight",
                     "head_lr_scale",
                     "bias_lr_scale", "budget", "patience", "monitor", "keep", "ema"),
    "augmentation": ("augment", "flip", "mix", "mix_alpha", "tta"),
    "runs": ("runs_dir", "checkpoint", "tensorboard"),
    "speed and devices": ("device", "precision", "threads", "devices", "scale_lr", "sync_bn", "micro_batch",
                          "channels_last", "compile", "eval_batch_size"),
}


def add_schema_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the schema's type, choices, help and default, in OPTION_GROUPS.

    Flags default to SUPPRESS, so the namespace holds only what the user typed and presets or config files
    fill in the rest.
    """

    fields = {field.name: field for field in schema()}
    for title, names in OPTION_GROUPS.items():
        _add_schema_group(parser.add_argument_group(title), [fields[name] for name in names])


def _add_schema_group(group, fields) -> None:
    for field in fields:
        rule = field.metadata["option"]
        base, _ = base_type(field_types()[field.name])
        origin = getattr(base, "__origin__", base)
        default = _default_text(default_of(field))
        help_text = rule.help.replace("%", "%%") + (f" (default: {default})" if default is not None else "")
        kwargs: dict = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if origin is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _cli_type(rule.parse) if rule.parse else origin
            kwargs["choices"] = rule.choices
            kwargs["metavar"] = rule.metavar
            if isinstance(rule.choices, LazyChoices):
                # A metavar keeps argparse from listing registry names (importing torch) while building the
                # parser; %(choices)s lists them only when the help is printed.
                kwargs["metavar"] = field.name.upper()
                kwargs["help"] = f"{help_text}; one of %(choices)s"
        group.add_argument(cli_flag(field.name), **kwargs)


def _add_train(sub) -> None:
    p = _command(sub, "train", "Train a model, evaluate it on the test set once, save plots and weights.",
                 "cnnkit train --dataset mnist --model seed --epochs 10 --data-dir ../shared/data\n"
                 "  cnnkit train --config runs/train/config.json --seed 1   # repeat a run with another seed\n"
                 "  cnnkit train --resume runs/.train.partial-abc123        # continue an interrupted run")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of options (a run's config.json repeats "
                                                     "that run); flags override it, it overrides the preset")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint (the "
                                                   "directory the interruption named), with its own options")
    add_schema_options(p)
    p.usage = "%(prog)s [--preset NAME] [--dataset NAME] [--model NAME] [--epochs N] [OPTION ...]\n" \
              "       %(prog)s --resume RUN"  # the whole list of flags is the groups below
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    _add_trust_code(p)
    _add_pixel_cap(p)
    p.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace, started: float) -> int:
    overrides = {name: value for name, value in vars(args).items() if name in FIELD_NAMES}
    log = (lambda *a, **k: None) if args.quiet else (lambda message: print(message, flush=True))
    if args.resume is not None:
        check_resume_options(args, overrides)
        devices = recorded_devices(args.resume)
    else:
        preset = overrides.pop("preset", None)
        config = resolve_config(preset, config_file=args.config, spell=cli_flag, **overrides)
        devices = config.devices
    if devices > 1 and "RANK" not in os.environ:  # not yet one of torchrun's processes: start them
        return launch_processes(devices, args.argv)
    # Imported once the options are checked: a mistyped value is refused without the second torch takes to load.
    from cnnkit.api import resume, train

    if args.resume is not None:
        result = resume(args.resume, progress=not args.quiet, started=started, log=log,
                        threads=overrides.get("threads"), trust_code=args.trust_code)
    else:
        result = train(config, progress=not args.quiet, started=started, log=log, trust_code=args.trust_code)
    if result.run_dir is None:  # another rank of a data-parallel run: rank 0 reports
        return 0
    for line in training_summary(result.metrics, result.history, result.run_dir):
        print(printable(line))  # class names and paths come from the user's folders
    print(printable(result.run_dir))
    return 0


#: What may change when a run resumes: how it runs on this machine, never what it computes.
RESUME_OPTIONS = frozenset({"threads"})


def check_resume_options(args: argparse.Namespace, overrides: dict) -> None:
    changed = sorted(cli_flag(name) for name in overrides if name not in RESUME_OPTIONS)
    if changed or args.config is not None:
        flags = ", ".join(changed + (["--config"] if args.config is not None else []))
        raise CnnkitError(f"--resume continues a run with its own options; drop {flags} (to train with other "
                          f"options, start a new run with --init)")


def recorded_devices(path: str) -> int:
    from cnnkit.api import recorded_config

    return recorded_config(path).devices


#: The file the processes of `cnnkit train --devices N` write their error lines to (its path in this variable),
#: which the launcher prints once every process has ended: each line once.
RANK_MESSAGES_ENV = "CNNKIT_RANK_MESSAGES"
RANK_MESSAGES = "cnnkit-rank-messages"


def launch_processes(devices: int, argv: list[str]) -> int:
    """Run this same command as `devices` data-parallel processes through torchrun's elastic launcher
    (standalone: a rendezvous on this machine); each process sees RANK and so trains instead of launching.

    Every process refuses a bad option the same way, and one that fails makes the launcher stop the others,
    which then say they were interrupted: their error lines go to one file (a flocked temporary file, swept
    by the next launch if this one is killed) and are printed here once each, errors before interruptions."""
    import logging
    import tempfile

    from torch.distributed.run import get_args_parser

    # --log-dir os.devnull: torchrun would otherwise make a folder of empty per-rank folders in the temporary folder
    # for every launch and leave it there (each process's output goes to this terminal; nothing is redirected).
    launcher = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={devices}", f"--log-dir={os.devnull}",
                                             "--module", PROG, *argv])
    # Its messages name torch's own files and say what cnnkit already sees to ("Setting OMP_NUM_THREADS ...": each
    # process sets its threads; "Sending process 1234 closing signal SIGINT", "failed (exitcode: 1)": the processes
    # and this launcher say what happened).
    for name in [name for name in logging.root.manager.loggerDict
                 if name.startswith("torch.distributed.elastic") or name == "torch.distributed.run"]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # each has its own level (torch's logging settings)
    folder = Path(tempfile.gettempdir())
    sweep_stale_temp_files(folder, RANK_MESSAGES)
    fd, messages = locked_temp_file(folder / RANK_MESSAGES)
    os.environ[RANK_MESSAGES_ENV] = str(messages)
    try:
        return run_launcher(launcher, messages)
    finally:
        del os.environ[RANK_MESSAGES_ENV]
        messages.unlink(missing_ok=True)
        os.close(fd)


def run_launcher(launcher: argparse.Namespace, messages: Path) -> int:
    """torchrun's launch, its end as this command's exit status and the processes' lines (rank_lines)."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    try:
        run(launcher)
    except SignalException:  # Ctrl-C or SIGTERM reached this launcher; it has passed it on to every process,
        errors, stops = rank_lines(messages)  # whose rank 0 said what was kept
        print_lines(errors + stops)
        return INTERRUPTED
    except ChildFailedError as error:
        codes = sorted({failure.exitcode for failure in error.failures.values()})
        errors, stops = rank_lines(messages)
        stopped = {INTERRUPTED, -signal.SIGINT, -signal.SIGTERM}
        if set(codes) <= stopped:  # stopped, not failed: they said so
            print_lines(stops)
            return INTERRUPTED
        # A failure: each error once, and the checkpoint the stopped rank 0 kept (a stop that kept none says nothing
        # more). A process that died without a line (a crash, whose traceback is above, or a kill) is named.
        print_lines(errors + [line for line in stops if "--resume" in line])
        if not errors:
            print(f"{PROG}: error: a training process failed (exit code {', '.join(map(str, codes))}); "
                  "its message, if any, is above", file=sys.stderr)
        return next((code for code in codes if code > 0 and code != INTERRUPTED), 1)
    return 0


def rank_lines(messages: Path) -> tuple[list[str], list[str]]:
    """The processes' lines (RANK, exit code, line; tab-separated), each once in rank order: (the errors, the
    interruptions). A process stopped because another failed only says it was stopped."""
    try:
        rows = [row.split("\t", 2) for row in messages.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return [], []
    rows = sorted((row for row in rows if len(row) == 3 and row[0].isdigit()), key=lambda row: int(row[0]))
    errors = [line for _, code, line in rows if code != str(INTERRUPTED)]
    stops = [line for _, code, line in rows if code == str(INTERRUPTED)]
    return list(dict.fromkeys(errors)), list(dict.fromkeys(stops))


def print_lines(lines: list[str]) -> None:
    """Lines on stderr, where each process would have printed its own."""
    for line in lines:
        print(line, file=sys.stderr)


def training_summary(metrics: dict, history, run_dir) -> list[str]:
    """What a person wants to know when training ends: the kept epoch, the test result and its
    uncertainty, the commonest mistakes, and where everything went (the run directory follows).
    `history` is the run's History callback (its `selected` record says which weights were kept)."""
    m, lines, selected = metrics, [], history.selected
    if selected is not None:
        row = history.epoch.index(selected.epoch)
        figures = "  ".join(f"{key} {history.history[selected.key(key)][row]:.4f}"
                            for key in ("val_accuracy", "val_loss") if selected.key(key) in history.history)
        lines.append(f"kept epoch {selected.epoch}/{m['epochs']} ({selected.keep}, {selected.weights} "
                     f"weights): {figures}")
    low, high = m["test_accuracy_ci95"]
    tta = f" with {m['tta']} test-time augmentation" if m.get("tta", "none") != "none" else ""
    lines.append(f"test accuracy {m['test_accuracy']:.4f}{tta} (95% CI {low:.4f}-{high:.4f}: {m['num_test']:,} test "
                 f"images are a finite sample)  test loss {m['test_loss']:.4f}")
    if m.get("imbalance"):
        rare = ", ".join(m["imbalance"]["rare"][:8])
        lines.append(f"training classes imbalanced {m['imbalance']['ratio']:.1f}:1 (rare: {rare}): balanced accuracy "
                     f"{m['balanced_accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    if m.get("most_confused"):
        pairs = ", ".join(f"{true} -> {predicted} ({count})" for true, predicted, count in m["most_confused"])
        lines.append(f"most confused (true -> predicted): {pairs}")
    lines.append(f"train {m['train_seconds']:.1f}s ({m['seconds_per_epoch']:.2f}s/epoch)  "
                 f"peak RSS {m['peak_rss_mb']:.0f} MB")
    lines.append(f"files: {', '.join(sorted(path.name for path in run_dir.iterdir()))}")
    return lines


def _add_evaluate(sub) -> None:
    p = _command(sub, "evaluate", "Evaluate a saved run on its dataset's test set (only the test files are needed).",
                 "cnnkit evaluate runs/train --limit 1000   # data from where the run was trained\n"
                 "  cnnkit evaluate runs/train --data-dir ../shared/data")
    _add_pixel_cap(p)
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the dataset lives (default: the run's recorded data_dir, then $CNNKIT_DATA, then "
                        "~/.cache/cnnkit, where missing test files are downloaded)")
    p.add_argument("--mirror", metavar="URL", help="base URL of a mirror laid out as URL/NAME/FILE ($CNNKIT_MIRROR)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate on a seeded slice of N test images")
    _add_tta(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_trust_code(p)
    p.set_defaults(handler=cmd_evaluate)


def _add_trust_code(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-code", action="store_true",
                        help="allow loading a run whose model is your own Python file (--model FILE.py:FUNCTION): "
                             "that runs the file, which must be unchanged since training")


def _add_tta(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tta", choices=["none", "flip", "shift", "flip-shift"],
                        help="test-time augmentation: average the logits over the image and its mirror (flip), "
                             "1-px shifts (shift) or both (default: the run's, from its training --tta)")


def cmd_evaluate(args: argparse.Namespace, started: float) -> int:
    from cnnkit.api import evaluate_run

    report = evaluate_run(args.run, args.data_dir, limit=args.limit, progress=not args.json, mirror=args.mirror,
                          tta=args.tta, trust_code=args.trust_code)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{markup(args.run)}: test accuracy {report.accuracy:.4f}, loss {report.loss:.4f}")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, p, r, f, s in zip(report.classes, report.precision, report.recall, report.f1, report.support):
        table.add_row(markup(name), f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(s))
    table_console().print(table)
    print(f"accuracy {report.accuracy:.4f}  loss {report.loss:.4f}")
    return 0


def _add_runs(sub) -> None:
    p = _command(sub, "runs", "List the runs in a runs folder, newest first, with their test accuracy.",
                 "cnnkit runs            # the runs/ folder\n  cnnkit runs experiments/runs --json")
    p.add_argument("runs_dir", metavar="DIR", nargs="?", default="runs", help="runs folder (default: runs)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(handler=cmd_runs)


def _shown(value, fmt: str = "{}", missing: str = "?") -> str:
    """A table cell: the value formatted (rich markup escaped), or `missing` when it could not be read."""
    return missing if value is None else markup(fmt.format(value))


def _duration(seconds: float | None) -> str:
    """12.3s, 4m05s, 2h03m: a training time as a person reads it."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def cmd_runs(args: argparse.Namespace, started: float) -> int:
    from cnnkit.runs import list_runs

    runs = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps([run.to_dict() for run in runs], indent=2))
        return 0
    if not runs:
        print(f"no runs in {args.runs_dir}")
        return 0
    from rich.table import Table

    table = Table(title=f"runs in {markup(str(args.runs_dir))}, newest first")
    for column in ("name", "dataset", "model", "epochs", "test accuracy", "train time", "date"):
        table.add_column(column, justify="right" if column in ("epochs", "test accuracy", "train time") else "left",
                         no_wrap=column == "date")
    for run in runs:
        table.add_row(markup(run.name), _shown(run.dataset), _shown(run.model), _shown(run.epochs),
                      _shown(run.test_accuracy, "{:.4f}"),
                      _duration(run.train_seconds),
                      "?" if run.date is None else run.date.strftime("%Y-%m-%d %H:%M"))
    console = table_console()
    console.print(table)
    for run in runs:
        if run.problem:
            console.print(f"{markup(run.name)}: not a complete run ({markup(run.problem)})", highlight=False)
    return 0


def _add_compare(sub) -> None:
    p = _command(sub, "compare", "Compare runs: a table of what each was and how it did, and one PNG overlaying "
                                 "their validation curves per epoch.",
                 "cnnkit compare runs/train runs/train2 --out compare.png")
    p.add_argument("runs", metavar="RUN", nargs="+", help="run directories")
    p.add_argument("--out", metavar="FILE.png",
                   help="where to write the figure (default: compare.png beside the first run, in its runs folder)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace, started: float) -> int:
    from cnnkit.comparison import compare

    out = args.out if args.out is not None else Path(args.runs[0]).expanduser().parent / "compare.png"
    rows = compare(args.runs, out=out)
    if args.json:
        print(json.dumps([row.to_dict() for row in rows], indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{len(rows)} run{'s' if len(rows) > 1 else ''} compared")
    columns = ("run", "dataset", "model", "preset", "epochs", "train time", "best val accuracy", "test accuracy")
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:4] else "right")
    for row in rows:
        run, best = row.summary, row.best_val_accuracy
        table.add_row(markup(row.label), _shown(run.dataset), _shown(run.model), _shown(run.preset, missing="-"),
                      _shown(run.epochs), _duration(run.train_seconds),
                      "-" if best is None else f"{best:.4f} (epoch {row.best_val_epoch})",
                      _shown(run.test_accuracy, "{:.4f}"))
    console = table_console()
    console.print(table)
    for row in rows:
        if row.summary.problem:
            console.print(f"{markup(row.label)}: not a complete run ({markup(row.summary.problem)})", highlight=False)
        if row.note:
            console.print(f"{markup(row.label)}: left out of the figure ({markup(row.note)})", highlight=False)
    plotted = sum(row.plotted for row in rows)
    print(f"validation curves of {plotted} run{'s' if plotted != 1 else ''}: {printable(str(out))}" if plotted
          else f"no run has validation history; {printable(str(out))} not written")
    return 0


def _add_predict(sub) -> None:
    p = _command(sub, "predict", "Predict the class of image files (any size or mode) with a saved run.",
                 "cnnkit predict runs/train digit.png photos/ --top 3 --csv predictions.csv")
    _add_pixel_cap(p)
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("images", metavar="IMAGE_OR_DIR", nargs="+", help="image files or directories of images")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of tab-separated lines")
    p.add_argument("--top", type=_positive_int, default=1, metavar="K", help="also report the K most likely classes")
    p.add_argument("--csv", metavar="FILE", help="also write file,label,confidence,top to this CSV file")
    p.add_argument("--show-input", metavar="DIR", help="write each image as the model saw it (after "
                                                        "preprocessing) as a PNG in DIR")
    p.add_argument("--explain", metavar="DIR", help="write each image with a heatmap of where the evidence for its "
                                                     "predicted class lies (Grad-CAM) as a PNG in DIR")
    p.add_argument("--explain-class", metavar="CLASS", help="with --explain: the class whose evidence to show "
                                                             "(default: each image's predicted class)")
    p.add_argument("--explain-layer", metavar="NAME", help="with --explain: the layer to read, by its name in the "
                                                            "model (default: the last one with a spatial map)")
    _add_tta(p)
    _add_trust_code(p)
    p.set_defaults(handler=cmd_predict)


#: How many skipped files `cnnkit predict`'s one error line names (a folder of 10,000 bad files stays one line).
SHOWN_SKIPPED = 10


def cmd_predict(args: argparse.Namespace, started: float) -> int:
    from cnnkit.prediction import predict_files, write_csv
    from cnnkit.runs import load_run

    run = load_run(args.run, tta=args.tta, trust_code=args.trust_code)
    csv_path = output_path(args.csv, "--csv") if args.csv else None  # refused before any prediction is made
    if (args.explain_class or args.explain_layer) and not args.explain:
        raise CnnkitError("--explain-class and --explain-layer go with --explain DIR (the folder for the heatmaps)")
    result = predict_files(run, args.images, top=args.top, progress=not args.json, show_input=args.show_input,
                           explain=args.explain, explain_class=args.explain_class, explain_layer=args.explain_layer)
    if csv_path:
        write_csv(result.predictions, csv_path)
        if not result.skipped:  # else the error line says it
            print(f"wrote {len(result.predictions):,} prediction(s) to {printable(str(csv_path))}", file=sys.stderr)
    if args.json:
        print(json.dumps([p.to_dict() for p in result.predictions], indent=2))
    else:
        for p in result.predictions:
            extra = "".join(f"\t{printable(label)}:{prob:.4f}" for label, prob in p.top[1:])
            print(f"{printable(p.file)}\t{printable(p.label)}\t{p.confidence:.4f}{extra}")
    if result.skipped:
        shown = "; ".join(result.skipped[:SHOWN_SKIPPED])
        more = f"; and {len(result.skipped) - SHOWN_SKIPPED} more" if len(result.skipped) > SHOWN_SKIPPED else ""
        written = f" (written to {printable(str(csv_path))})" if csv_path and result.predictions else ""
        what = (f"skipped {len(result.skipped)} unreadable file(s), predicted the other {len(result.predictions):,}"
                f"{written}" if result.predictions else "nothing to predict")
        print(f"{PROG}: error: {what}: {one_line(shown)}{more}", file=sys.stderr)
        return 1
    return 0


def _add_export(sub) -> None:
    p = _command(sub, "export", "Export a run's model as ONNX or TorchScript: uint8 images in, probabilities out "
                                "(scaling and softmax inside the graph), checked against PyTorch on real test images.",
                 "cnnkit export runs/train --format onnx\n"
                 "  cnnkit export runs/train --format torchscript --out deploy/model.pt")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="(default: onnx)")
    p.add_argument("--out", metavar="PATH", help="file to write (default: RUN/model.onnx or RUN/model.torchscript.pt)")
    p.add_argument("--parity-images", type=_positive_int, default=1000, metavar="N",
                   help="test images the export is checked on against PyTorch (default 1000)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the run's dataset lives for the check (default: the run's recorded data_dir, then "
                        "$CNNKIT_DATA or the cache; never downloaded; seeded random images if absent)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_trust_code(p)
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace, started: float) -> int:
    from cnnkit.export import export_run

    result = export_run(args.run, args.format, out=args.out, parity_images=args.parity_images,
                        data_dir=args.data_dir, trust_code=args.trust_code)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0 picks a free port), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_serve(sub) -> None:
    p = _command(sub, "serve", "Serve a saved run over HTTP: a page to draw or upload an image on, and a JSON "
                               "API (POST /predict, GET /model, GET /health; docs at /docs).",
                 "cnnkit serve runs/train --port 8000")
    _add_pixel_cap(p)
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=_positive_float, default=10, metavar="MB",
                   help="refuse larger uploads with HTTP 413 (default 10 MiB)")
    p.add_argument("--stall-timeout", type=_positive_float, metavar="S",
                   help="close a connection whose client sends nothing for S seconds while the server waits on it "
                        "(half a request, half an upload); default 10")
    _add_trust_code(p)
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace, started: float) -> int:
    from cnnkit.serve import serve
    from cnnkit.serve.app import STALL_TIMEOUT_S

    serve(args.run, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, trust_code=args.trust_code,
          stall_timeout_s=args.stall_timeout or STALL_TIMEOUT_S)
    return 0


def _add_audit(sub) -> None:
    p = _command(sub, "audit", "Find what is wrong with a dataset: likely mislabelled training images (out-of-sample "
                               "probabilities from k-fold cross-validation, then cleanlab), exact and near-duplicate "
                               "images, and test images with a copy in training.",
                 "cnnkit audit imagefolder:photos --out audit   # or a run: cnnkit audit runs/train (writes "
                 "runs/train/audit)")
    p.add_argument("target", metavar="RUN_OR_DATASET", help="a run directory (its dataset, audited with its recipe) "
                                                            "or a dataset: mnist, imagefolder:PATH, ...")
    p.add_argument("--out", metavar="DIR", help="folder for label_issues.csv, duplicates.csv and their contact "
                                                "sheets (default for a run: RUN/audit)")
    p.add_argument("--folds", type=_positive_int, default=5, metavar="K", help="cross-validation folds (default 5)")
    p.add_argument("--epochs", type=_positive_int, metavar="N",
                   help="training epochs of each fold's model (default 3; with a frozen backbone the recipe's own, "
                        "as its head trains on cached features in seconds)")
    p.add_argument("--preset", metavar="NAME", help="the recipe of each fold's model (default: the run's, or "
                                                    "cnnkit's default model for a dataset)")
    p.add_argument("--model", metavar="NAME", help="the architecture of each fold's model")
    p.add_argument("--max-distance", type=int, default=None, metavar="BITS",
                   help="perceptual-hash bits (of 64) two near-duplicates may differ in (default 4)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="audit the first N training images only")
    p.add_argument("--only", choices=("labels", "duplicates"), help="run one of the two audits")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and their models")
    _add_data_dir(p)
    _add_trust_code(p)
    p.set_defaults(handler=cmd_audit)


def cmd_audit(args: argparse.Namespace, started: float) -> int:
    from cnnkit.audit import NEAR_DISTANCE, audit

    distance = NEAR_DISTANCE if args.max_distance is None else args.max_distance
    if not 0 <= distance <= 32:
        raise CnnkitError(f"--max-distance must be from 0 to 32 bits, got {distance}")
    result = audit(args.target, args.out, folds=args.folds, epochs=args.epochs, preset=args.preset, model=args.model,
                   max_distance=distance, data_dir=args.data_dir, limit=args.limit,
                   labels=args.only != "duplicates", duplicates=args.only != "labels", seed=args.seed,
                   trust_code=args.trust_code,
                   log=lambda line: print(printable(line), file=sys.stderr))
    if args.only != "duplicates":
        print(f"label issues: {len(result.issues):,} of {result.pool:,} training images "
              f"({100 * len(result.issues) / max(1, result.pool):.1f}%) look mislabelled")
    if args.only != "labels":
        exact = sum(pair.exact for pair in result.pairs)
        print(f"duplicates: {len(result.pairs):,} pair(s) among {result.images:,} images ({exact:,} exact); "
              f"{result.leaks:,} test image(s) with a copy outside the test split")
    print("wrote " + ", ".join(printable(str(path)) for path in result.written))
    return 0


def _add_report(sub) -> None:
    p = _command(sub, "report", "Write RUN/report.html: one self-contained page with the run's numbers and figures.",
                 "cnnkit report runs/train   # then open runs/train/report.html in a browser")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace, started: float) -> int:
    from cnnkit.report import write_report

    print(write_report(Path(args.run)))
    return 0


def _add_datasets(sub) -> None:
    p = _command(sub, "datasets", "List the known datasets and whether each is present, download one, or write "
                                  "some of its test images as PNG files in class folders.",
                 "cnnkit datasets download fashion-mnist\n  cnnkit datasets sample mnist digits --count 200")
    p.add_argument("action", nargs="?", choices=["list", "download", "sample"], default="list")
    p.add_argument("name", nargs="?", help="dataset to download or sample")
    p.add_argument("out", nargs="?", metavar="DIR", help="sample: the new folder for the images")
    p.add_argument("--count", type=_positive_int, default=100, metavar="N",
                   help="sample: how many test images (default 100, a seeded spread over the classes)")
    _add_data_dir(p)
    p.add_argument("--mirror", metavar="URL", help="base URL of a mirror laid out as URL/NAME/FILE ($CNNKIT_MIRROR)")
    p.set_defaults(handler=cmd_datasets)


def cmd_datasets(args: argparse.Namespace, started: float) -> int:
    from cnnkit.data.download import DATA_ENV, data_root, dataset_present, fetch_dataset

    root = data_root(args.data_dir)
    if args.action == "download":
        if not args.name:
            raise CnnkitError("`cnnkit datasets download` needs a dataset name, e.g. mnist")
        folder = fetch_dataset(get_spec(args.name), root, mirror=args.mirror, progress=True)
        print(folder)
        return 0
    if args.action == "sample":
        return _sample_dataset(args)
    from rich.table import Table

    table = Table(title=f"datasets in {root}")
    for column in ("name", "present", "classes", "shape", "description"):
        table.add_column(column)
    for spec in DATASETS.values():
        table.add_row(spec.name, "yes" if dataset_present(spec, root) else "no", str(len(spec.classes)),
                      "x".join(map(str, spec.shape)), spec.description)
    table_console().print(table)
    print(f"looked in {root} (--data-dir DIR or {DATA_ENV}=DIR to look elsewhere)")
    print("also: imagefolder:PATH (class subfolders of images, optionally under train/ val/ test/)")
    return 0


def _sample_dataset(args: argparse.Namespace) -> int:
    from cnnkit.data.samples import write_samples
    from cnnkit.data.tensors import load_dataset

    if not args.name or not args.out:
        raise CnnkitError("`cnnkit datasets sample` needs a dataset and a new folder, e.g. mnist digits")
    data = load_dataset(args.name, args.data_dir, limit_eval=args.count, progress=True)

    prefix = (image_folder(args.name) or args.name).rstrip("/").rsplit("/", 1)[-1]
    folder = write_samples(data.test.images.numpy(), data.test.labels.numpy(), data.classes, args.out, prefix)
    print(f"wrote {len(data.test):,} {data.name} test images to {folder}/<class>/")
    return 0


def _add_summary(sub) -> None:
    p = _command(sub, "summary", "Print a model's layers with output shapes and parameter counts.",
                 "cnnkit summary seed --dataset mnist")
    p.add_argument("model", metavar="MODEL", nargs="?", help="architecture name")
    p.add_argument("--dataset", default="mnist", help="dataset whose input shape and classes to use (default mnist)")
    p.add_argument("--list", action="store_true", help="list the architectures")
    p.set_defaults(handler=cmd_summary)


def cmd_summary(args: argparse.Namespace, started: float) -> int:
    from cnnkit.models import build_model, list_models
    from cnnkit.models.summary import summary_table

    console = table_console()
    if args.list or not args.model:
        for entry in list_models():
            console.print(f"{entry.name:10s} {entry.description}", highlight=False)
        return 0
    shape, num_classes = _dataset_shape(args.dataset)
    model = build_model(args.model, shape, num_classes)
    console.print(summary_table(model, shape, title=f"{args.model} ({args.dataset}, input {shape})"))
    return 0


def _dataset_shape(name: str) -> tuple[tuple[int, int, int], int]:
    """Input shape and class count: from the registry, or by loading an image folder (cached after once)."""

    if image_folder(name) is None:
        spec = get_spec(name)
        return spec.shape, len(spec.classes)
    from cnnkit.data.tensors import load_dataset

    data = load_dataset(name, progress=False)
    return data.input_shape, data.num_classes


def _add_presets(sub) -> None:
    p = _command(sub, "presets", "List the training presets and what each sets.", "cnnkit train --preset fast")
    p.set_defaults(handler=cmd_presets)


def cmd_presets(args: argparse.Namespace, started: float) -> int:
    for preset in list_presets():
        print(f"{preset.name}: {preset.description}")
        if preset.extends:
            print(f"    extends {preset.extends}")
        settings = preset.values or {"(defaults)": "the tutorial's recipe"}
        for key, value in settings.items():
            print(f"    {key.replace('_', '-')} = {json.dumps(value) if isinstance(value, (dict, list)) else value}")
        if preset.measured:
            print(f"    measured: {preset.measured.get('result', '')}")
            print(f"      by `{preset.measured.get('command', '')}` on {preset.measured.get('machine', '?')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, formatter_class=_formatter,
        description="Train, evaluate and use convolutional image classifiers.",
        epilog="examples:\n  cnnkit train --data-dir ../shared/data\n  cnnkit train --preset fast\n"
               "  cnnkit predict runs/train digit.png",
    )

    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    _add_debug(parser, default=False)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (_add_train, _add_evaluate, _add_predict, _add_runs, _add_compare, _add_report, _add_audit, _add_export,
                _add_serve, _add_datasets, _add_summary, _add_presets):
        add(sub)
    return parser


def stop_on_sigterm() -> None:
    """SIGTERM (what `kill`, a job scheduler or a container stop sends) ends cnnkit as Ctrl-C does.

    Without this, Python dies at once on SIGTERM: no cleanup, no message. As a KeyboardInterrupt it
    unwinds normally: temporary files go, a training keeps its checkpoint and says how to resume it.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: `--devices N` runs it again N times
    if extra:  # reported by the command's own parser, which knows its flags and can suggest one
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    stop_on_sigterm()
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        refuse_empty_paths(args)
        _apply_pixel_cap(args)
        return args.handler(args, started)
    except CnnkitError as error:
        return user_error(str(error), getattr(error, "exit_code", 1), debug)
    except BrokenPipeError:  # `cnnkit predict ... | head`: the reader has what it wanted; not an error to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit cannot fail again
        os.close(devnull)
        return BROKEN_PIPE
    except OSError as error:
        if error.errno == errno.ENOMEM:  # an allocation the kernel refused (mmap, a listing): memory, not the path
            return user_error(OUT_OF_MEMORY, 1, debug)
        problem = describe_os_error(error)
        if problem is None:  # not one a user can fix: a bug, with its traceback
            raise
        return user_error(problem, 1, debug)
    except MemoryError:  # the machine's (or a ulimit's) memory, not a bug: one line with what asks for less
        return user_error(OUT_OF_MEMORY, 1, debug)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # another data-parallel process: rank 0 says what was kept
            say_line(f"{PROG}: interrupted; nothing was saved", INTERRUPTED)
        return INTERRUPTED


#: What each path-like argument names, by its metavar: an empty one is refused saying so.
PATH_KINDS = {"DIR": "a folder", "FILE": "a file", "FILE.png": "a file", "PATH": "a path", "RUN": "a run directory",
              "IMAGE_OR_DIR": "an image or a folder", "RUN_OR_DATASET": "a run directory or a dataset"}


def refuse_empty_paths(args: argparse.Namespace) -> None:
    """A path argument given as '' (an unset shell variable: `--config "$CFG"`) is refused by name, instead of
    being read as the current directory ('.') and refused for what '.' is. The training options have their own
    check on `train` (config._check_path); the other commands' --data-dir has none of its own."""
    training = args.handler is cmd_train
    for action in args.parser._actions:
        if action.metavar not in PATH_KINDS or (training and action.option_strings and action.dest in FIELD_NAMES):
            continue
        value = getattr(args, action.dest, None)
        if any(isinstance(item, str) and not item.strip() for item in (value if isinstance(value, list) else [value])):
            name = action.option_strings[0] if action.option_strings else action.metavar
            raise CnnkitError(f"{name} is empty; give {PATH_KINDS[action.metavar]}")


def console_main() -> NoReturn:
    """The `cnnkit` command and `python -m cnnkit`: main()'s exit status, except that a command stopped by Ctrl-C
    or SIGTERM, once it has cleaned up and said so, ends the way Python ends an interrupted program: by SIGINT.

    A shell reads that as status 130, as it would an exit(130), but a shell loop or `make` around cnnkit stops
    too instead of going on to the next command. It is also the one end CPython allows for certain: a Ctrl-C
    that lands while library code runs a string through exec (a dataclass or namedtuple being made, as torch's
    first optimizer step does) marks the interpreter, and under `python -m` it kills itself by SIGINT after a
    clean exit(130) all the same: 6 of 60 trainings interrupted in their first second ended so. Either way the
    process ends without Python's teardown of its modules (lifetime.end_process), a bug's traceback included.
    """
    try:
        code = main()
    except SystemExit as exit:  # argparse's --help, --version and usage errors
        if not isinstance(exit.code, (int, type(None))):
            raise
        code = exit.code or 0
    except Exception:  # a bug: its traceback and status 1, as Python ends on one
        sys.excepthook(*sys.exc_info())
        end_process(1, interrupted=False)  # inside the handler: what the traceback holds (a DDP model) is not freed
    end_process(code, interrupted=code == INTERRUPTED)


def user_error(message: str, code: int, debug: bool) -> int:
    """Print a user's error as one line (after its traceback with --debug) and return the exit code.

    The message names the file or option and the fix; a traceback would only bury it, so it is shown
    only on request, for a bug report.
    """
    if debug:
        import traceback

        traceback.print_exc()
    say_line(f"{PROG}: error: {one_line(message)}", code)
    return code


def say_line(line: str, code: int) -> None:
    """`line` on stderr; from a process of `cnnkit train --devices N`, to the launcher, which prints each line
    once when every process has ended (launch_processes)."""
    messages = os.environ.get(RANK_MESSAGES_ENV)
    if messages and os.environ.get("RANK", "").isdigit():
        try:  # the launcher's file, never a new one (once it is gone, nobody would read it): one write, appended
            fd = os.open(messages, os.O_WRONLY | os.O_APPEND)
        except OSError:
            fd = None  # the launcher is gone: say it here
        if fd is not None:
            try:
                os.write(fd, f"{os.environ['RANK']}\t{code}\t{line}\n".encode("utf-8", "replace"))
                return
            except OSError:
                pass
            finally:
                os.close(fd)
    print(line, file=sys.stderr)


def one_line(message: str) -> str:
    """`message` with its control characters escaped (\\n, \\x1e, ...): a file name or an argument may hold a
    line break of any kind (str.splitlines knows eight, terminals more), and the error is one line."""
    return printable(message, keep_tab=True)
