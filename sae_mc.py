"""``sae-mc``: train, compare, evaluate and calibrate SAEs through SAELens's own runners.

    sae-mc train CONFIG.yaml [--set sae.k=64 ...]      one SAE (a LanguageModelSAERunnerConfig in YAML)
    sae-mc compare CONFIG.yaml [--set ...] [--quick]   several SAEs on the same activations, then evaluated
    sae-mc eval CONFIG.yaml PATH...                    evaluate saved SAEs on CONFIG's model, hook and corpus
    sae-mc calibrate CONFIG.yaml CHECKPOINT OUT        exact thresholds on held-out text, written as a new SAE
    sae-mc demo [--quick]                              compare the packaged demo config: the README's main job
    sae-mc upstream-patch FILE [--against DIR]         write the SAELens pull request as a patch

This module only parses the command line; torch, SAELens and the package load after parsing, so
``sae-mc --help`` answers at once. The commands live in :mod:`sae_mutual_choice.app.cli`.
"""

import argparse
import os
import sys
import time


def parser() -> argparse.ArgumentParser:
    """The ``sae-mc`` argument parser."""
    root = argparse.ArgumentParser(
        prog="sae-mc",
        description="Train, compare, evaluate and calibrate SAEs through SAELens's own runners.",
        epilog="Configs and outputs: docs/usage.md. Exit status 2: bad input (nothing was written).",
    )
    commands = root.add_subparsers(dest="command", required=True)
    helps = {
        "train": "train one SAE (a LanguageModelSAERunnerConfig in YAML)",
        "compare": "train several SAEs on the same activations, then evaluate them side by side",
        "eval": "evaluate saved SAEs on a compare config's model, hook and held-out text",
        "calibrate": "calibrate a Mutual/Feature Choice training checkpoint on held-out text",
        "demo": "the README's main job: compare the packaged demo config",
    }
    patch_help = "write the SAELens pull request (Mutual and Feature Choice) as a patch for git apply"
    patch = commands.add_parser("upstream-patch", help=patch_help, description=patch_help)
    patch.add_argument("file", help="where to write the patch")
    patch.add_argument(
        "--against",
        help="root of the unpacked SAELens wheel it applies to (default: the installed SAELens)",
    )
    for name, text in helps.items():
        command = commands.add_parser(name, help=text, description=text)
        if name != "demo":
            command.add_argument("config", help="YAML config")
        command.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (dotted key)"
        )
        if name == "eval":
            command.add_argument("paths", nargs="*", help="saved SAE directories (with a cfg.json)")
        if name == "calibrate":
            command.add_argument("checkpoint", help="a training checkpoint of a mutual/feature choice SAE")
            command.add_argument("out", help="where to write the calibrated inference SAE")
        if name in ("compare", "demo"):
            command.add_argument("--quick", action="store_true", help="apply the config's `quick` overrides")
            command.add_argument("--out", help="results directory (default: the config's)")
        if name in ("train", "compare", "demo"):
            command.add_argument(
                "--wandb", action="store_true", help="log to wandb online (default: offline)"
            )
    return root


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 on bad input (a one-line error on stderr), 1 on failed evaluations."""
    args = parser().parse_args(argv)
    if not getattr(args, "wandb", False):
        os.environ.setdefault("WANDB_MODE", "offline")
        # Offline, wandb's end-of-run history and summary repeat what the run prints; where it keeps the run stays.
        os.environ.setdefault("WANDB_QUIET", "true")
    from sae_mutual_choice.app import cli

    start = time.perf_counter()
    try:
        status = cli.run(args)
    except (ValueError, FileNotFoundError) as error:  # bad config or input: say what, not where
        print(f"sae-mc {args.command}: error: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
