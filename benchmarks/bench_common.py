"""What the evidence benchmarks share: their command line, their settings file, their docs/results.md section.

Each benchmark owns one section of docs/results.md, delimited by ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->``; the text around the sections (the reading of the results) is written by hand.
"""

import argparse
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parent.parent
RESULTS_MD = ROOT / "docs" / "results.md"


def parse_arguments(description: str, name: str, combine: bool = False) -> argparse.Namespace:
    """``--config`` (default configs/benchmarks/NAME.yaml), ``--quick``, ``--out`` (default
    docs/results/CONFIG-STEM[-quick].json), ``--render FILE.json`` and ``--set KEY=VALUE`` overrides;
    with ``combine``, ``--combine FILE.json...`` too."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmarks" / f"{name}.yaml")
    parser.add_argument("--quick", action="store_true", help="the config's 'quick' overrides (a smoke run)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON output (default: docs/results/<config name>.json)"
    )
    parser.add_argument(
        "--render", type=Path, default=None, help="only rewrite docs/results.md from this JSON"
    )
    if combine:
        parser.add_argument(
            "--combine", type=Path, nargs="+", default=None, help="one table from these runs' JSON files"
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one (dotted) setting, VALUE read as YAML, e.g. --set runner.training_tokens=409600",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = ROOT / "docs" / "results" / f"{args.config.stem}{'-quick' if args.quick else ''}.json"
    return args


def load_settings(path: Path, quick: bool, overrides: list[str] | None = None) -> dict[str, Any]:
    """A benchmark's YAML settings; with ``quick``, its ``quick`` section's (dotted) keys override them,
    then each ``KEY=VALUE`` of ``overrides`` does."""
    settings = yaml.safe_load(path.read_text())
    quick_changes = settings.pop("quick", {})
    changes = dict(quick_changes) if quick else {}
    for item in overrides or []:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        changes[key] = yaml.safe_load(value)
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        if section and section not in settings:
            raise ValueError(f"--set {key}: no section {section!r} in {path}")
        (settings[section] if section else settings)[field] = value
    return settings


def write_section(name: str, markdown: str, path: Path = RESULTS_MD) -> None:
    """Replace section ``name`` of ``path`` with ``markdown`` (appended at the end if the section is new)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
