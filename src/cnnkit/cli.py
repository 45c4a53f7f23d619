"""Command line: parses arguments and calls the same functions the Python API exposes.

Only argparse and the standard library are imported at start-up, so `cnnkit --help` answers at once;
torch, plotting and data code are imported inside the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from cnnkit.errors import CnnkitError

PROG = "cnnkit"


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _command(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                          formatter_class=_formatter, allow_abbrev=False)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR",
                        help="where datasets live / are downloaded (default: $CNNKIT_DATA or ~/.cache/cnnkit)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


def add_schema_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the schema's type, choices, help and default.

    Flags default to SUPPRESS, so the namespace holds only what the user typed and presets or config files
    fill in the rest.
    """
    from cnnkit.config import LazyChoices, base_type, cli_flag, default_of, field_types, schema

    for field in schema():
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
        parser.add_argument(cli_flag(field.name), **kwargs)


def _add_train(sub) -> None:
    p = _command(sub, "train", "Train a model, evaluate it on the test set once, save plots and weights.",
                 "cnnkit train --dataset mnist --model seed --epochs 10 --data-dir ../shared/data\n"
                 "  cnnkit train --config runs/train/config.json --seed 1   # repeat a run with another seed")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of options (a run's config.json repeats "
                                                     "that run); flags override it, it overrides the preset")
    add_schema_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace, started: float) -> int:
    from cnnkit.api import train
    from cnnkit.config import FIELD_NAMES, cli_flag, resolve_config

    overrides = {name: value for name, value in vars(args).items() if name in FIELD_NAMES}
    preset = overrides.pop("preset", None)
    config = resolve_config(preset, config_file=args.config, spell=cli_flag, **overrides)
    log = (lambda *a, **k: None) if args.quiet else (lambda message: print(message, flush=True))
    result = train(config, progress=not args.quiet, started=started, log=log)
    m = result.metrics
    print(f"test accuracy {m['test_accuracy']:.4f}  test loss {m['test_loss']:.4f}  "
          f"train {m['train_seconds']:.1f}s ({m['seconds_per_epoch']:.2f}s/epoch)  peak RSS {m['peak_rss_mb']:.0f} MB")
    print(result.run_dir)
    return 0


def _add_evaluate(sub) -> None:
    p = _command(sub, "evaluate", "Evaluate a saved run on its dataset's test set.",
                 "cnnkit evaluate runs/train --data-dir ../shared/data")
    p.add_argument("run", metavar="RUN", help="run directory")
    _add_data_dir(p)
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate on a seeded slice of N test images")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace, started: float) -> int:
    from cnnkit.api import evaluate_run

    report = evaluate_run(args.run, args.data_dir, limit=args.limit, progress=not args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.run}: test accuracy {report.accuracy:.4f}, loss {report.loss:.4f}")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, p, r, f, s in zip(report.classes, report.precision, report.recall, report.f1, report.support):
        table.add_row(name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(s))
    Console().print(table)
    print(f"accuracy {report.accuracy:.4f}  loss {report.loss:.4f}")
    return 0


def _add_predict(sub) -> None:
    p = _command(sub, "predict", "Predict the class of image files (any size or mode) with a saved run.",
                 "cnnkit predict runs/train digit.png photos/ --top 3")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("images", metavar="IMAGE_OR_DIR", nargs="+", help="image files or directories of images")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of tab-separated lines")
    p.add_argument("--top", type=_positive_int, default=1, metavar="K", help="also report the K most likely classes")
    p.set_defaults(handler=cmd_predict)


def cmd_predict(args: argparse.Namespace, started: float) -> int:
    from cnnkit.prediction import predict_files
    from cnnkit.runs import load_run

    predictions = predict_files(load_run(args.run), args.images, top=args.top)
    if args.json:
        print(json.dumps([p.to_dict() for p in predictions], indent=2))
        return 0
    for p in predictions:
        extra = "".join(f"\t{label}:{prob:.4f}" for label, prob in p.top[1:])
        print(f"{p.file}\t{p.label}\t{p.confidence:.4f}{extra}")
    return 0


def _add_datasets(sub) -> None:
    p = _command(sub, "datasets", "List the known datasets and whether each is present, or download one.",
                 "cnnkit datasets download fashion-mnist")
    p.add_argument("action", nargs="?", choices=["list", "download"], default="list")
    p.add_argument("name", nargs="?", help="dataset to download")
    _add_data_dir(p)
    p.add_argument("--mirror", metavar="URL", help="base URL of a mirror laid out as URL/NAME/FILE ($CNNKIT_MIRROR)")
    p.set_defaults(handler=cmd_datasets)


def cmd_datasets(args: argparse.Namespace, started: float) -> int:
    from cnnkit.data.download import data_root, dataset_present, fetch_dataset
    from cnnkit.data.registry import DATASETS, get_spec

    root = data_root(args.data_dir)
    if args.action == "download":
        if not args.name:
            raise CnnkitError("`cnnkit datasets download` needs a dataset name, e.g. mnist")
        folder = fetch_dataset(get_spec(args.name), root, mirror=args.mirror, progress=True)
        print(folder)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"datasets in {root}")
    for column in ("name", "present", "classes", "shape", "description"):
        table.add_column(column)
    for spec in DATASETS.values():
        table.add_row(spec.name, "yes" if dataset_present(spec, root) else "no", str(len(spec.classes)),
                      "x".join(map(str, spec.shape)), spec.description)
    Console().print(table)
    print("also: imagefolder:PATH (class subfolders of images, optionally under train/ val/ test/)")
    return 0


def _add_summary(sub) -> None:
    p = _command(sub, "summary", "Print a model's layers with output shapes and parameter counts.",
                 "cnnkit summary seed --dataset mnist")
    p.add_argument("model", metavar="MODEL", nargs="?", help="architecture name")
    p.add_argument("--dataset", default="mnist", help="dataset whose input shape and classes to use (default mnist)")
    p.add_argument("--list", action="store_true", help="list the architectures")
    p.set_defaults(handler=cmd_summary)


def cmd_summary(args: argparse.Namespace, started: float) -> int:
    from rich.console import Console

    from cnnkit.models import build_model, list_models
    from cnnkit.models.summary import summary_table

    console = Console()
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
    from cnnkit.data.registry import get_spec

    if not name.startswith("imagefolder:"):
        spec = get_spec(name)
        return spec.shape, len(spec.classes)
    from cnnkit.data.tensors import load_dataset

    data = load_dataset(name, progress=False)
    return data.input_shape, data.num_classes


def _add_presets(sub) -> None:
    p = _command(sub, "presets", "List the training presets and what each sets.", "cnnkit train --preset fast")
    p.set_defaults(handler=cmd_presets)


def cmd_presets(args: argparse.Namespace, started: float) -> int:
    from cnnkit.config import list_presets

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
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_formatter, allow_abbrev=False,
        description="Train, evaluate and use convolutional image classifiers.",
        epilog="examples:\n  cnnkit train --data-dir ../shared/data\n  cnnkit train --preset fast\n"
               "  cnnkit predict runs/train digit.png",
    )
    from cnnkit import __version__

    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (_add_train, _add_evaluate, _add_predict, _add_datasets, _add_summary, _add_presets):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args, started)
    except CnnkitError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was saved", file=sys.stderr)
        return 130
