"""``compare``: train several SAEs on the same activations with SAELens's ``MultiSAETrainingRunner``
(one LLM pass feeds every SAE), then evaluate them, and SAEs that are only evaluated, side by side.

A compare config (YAML) has four sections:

- ``runner``: the fields of ``MultiSAETrainingRunnerConfig`` shared by every SAE (model, hook, corpus,
  tokens, learning rate, ...), strictly checked;
- ``saes``: name -> a training SAE config (``architecture`` picks any registered one);
- ``evaluate_only``: name -> ``{path: DIR}`` (anything ``SAE.load_from_disk`` reads) or
  ``{release: R, sae_id: ID}`` (``SAE.from_pretrained``);
- ``evaluation``: ``held_out_batches`` (prompt batches of held-out text for the diagnostics),
  ``eval_batches`` (for SAELens's ``run_evals``), ``batch_prompts`` (prompts per batch),
  ``held_out_dataset`` (the held-out text; default: the embedded corpus's held-out split, or the
  runner's ``dataset_path`` for other corpora), ``output_dir``, ``note`` (what the run is, printed
  above its table);
- ``quick`` (optional): dotted overrides applied by ``--quick``.
"""

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, LoggingConfig
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig
from sae_lens.training.activations_store import ActivationsStore

from sae_mutual_choice.app import embedded, preflight
from sae_mutual_choice.app.checkpoints import load_training_checkpoint
from sae_mutual_choice.app.evaluate import (
    allocation_diagnostics,
    at_k,
    held_out_activations,
    saelens_metrics,
    trained_k,
)
from sae_mutual_choice.app.progress import training_progress
from sae_mutual_choice.app.report import markdown_table, write_results
from sae_mutual_choice.app.yaml_config import check_fields, sae_config_from_dict
from sae_mutual_choice.fast import data_parallel
from sae_mutual_choice.fast.collectives import rank, world_size
from sae_mutual_choice.upstream.adaptive_allocation import check_integer, check_range
from sae_mutual_choice.upstream.mutual_choice_sae import calibrate_thresholds

SECTIONS = {"runner", "saes", "evaluate_only", "evaluation", "quick"}
AT_K_METRICS = ("l0_mean", "explained_variance", "normalized_mse", "ce_loss_score")


@dataclass
class Evaluation:
    """How the compared SAEs are evaluated on held-out text."""

    held_out_batches: int = 8
    eval_batches: int = 4
    batch_prompts: int = 8
    held_out_dataset: str | None = None
    output_dir: str = "results/compare"
    note: str | None = None  # what this run is, printed and written above the results table
    # The L0 of the "@k" columns of adaptive SAEs: a number, or an evaluated SAE's name (its k, or its
    # mean L0). None: the L0 of the SAEs from outside this run (evaluate_only, eval's paths) whose L0
    # is fixed (topk), when they share one; else each SAE's own k.
    at_l0: float | str | None = None

    def __post_init__(self) -> None:
        for name in ("held_out_batches", "eval_batches", "batch_prompts"):
            check_integer(f"evaluation.{name}", getattr(self, name), 1)
        if not isinstance(self.at_l0, str | None):
            check_range("evaluation.at_l0", self.at_l0, 0, math.inf, low_open=True)


@dataclass
class CompareSpec:
    runner: dict[str, Any]
    saes: dict[str, Any]
    evaluate_only: dict[str, dict[str, str]] = field(default_factory=dict)
    evaluation: Evaluation = field(default_factory=Evaluation)

    @property
    def output_dir(self) -> str:
        return self.evaluation.output_dir

    @output_dir.setter
    def output_dir(self, value: str) -> None:
        self.evaluation.output_dir = value

    @classmethod
    def from_dict(cls, data: dict[str, Any], quick: bool = False) -> "CompareSpec":
        unknown = set(data) - SECTIONS
        if unknown:
            hint = " (this looks like a `sae-mc train` config)" if {"sae", "model_name"} & unknown else ""
            raise ValueError(
                f"unknown config section(s) {sorted(unknown)}{hint}; a compare config has the sections "
                f"{sorted(SECTIONS)}"
            )
        if quick:
            for key, value in (data.get("quick") or {}).items():
                section, *path = key.split(".")
                node = data.setdefault(section, {})
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = value
        runner = dict(data.get("runner") or {})
        check_fields(runner, MultiSAETrainingRunnerConfig, "runner.", {"logger"})
        check_fields(runner.get("logger", {}), LoggingConfig, "runner.logger.")
        if "saes" in runner:
            raise ValueError("runner.saes: list the SAEs in the top-level `saes` section")
        saes = {
            name: sae_config_from_dict(sae, f"saes.{name}.") for name, sae in (data.get("saes") or {}).items()
        }
        evaluate_only = data.get("evaluate_only") or {}
        for name, entry in evaluate_only.items():
            if not isinstance(entry, dict) or not (
                {"path"} == set(entry) or {"release", "sae_id"} == set(entry)
            ):
                raise ValueError(
                    f"evaluate_only.{name} must be {{path: DIR}} or {{release: R, sae_id: ID}}, got {entry!r}"
                )
        evaluation = data.get("evaluation") or {}
        check_fields(evaluation, Evaluation, "evaluation.")
        return cls(runner, saes, evaluate_only, Evaluation(**evaluation))

    def setting(self, name: str) -> Any:
        """A ``runner`` field, or MultiSAETrainingRunnerConfig's default for it."""
        if name in self.runner:
            return self.runner[name]
        (field_,) = [f for f in dataclasses.fields(MultiSAETrainingRunnerConfig) if f.name == name]
        return field_.default_factory() if field_.default is dataclasses.MISSING else field_.default  # type: ignore[misc]

    @property
    def hook(self) -> str:
        """The hook every SAE reads (one shared hook: that is what the comparison is about)."""
        hooks = self.setting("hook_names")
        if isinstance(hooks, str):
            return hooks
        if len(set(hooks.values())) != 1:
            raise ValueError(
                f"runner.hook_names: compare evaluates one hook, got {sorted(set(hooks.values()))}"
            )
        return next(iter(hooks.values()))

    def multi_runner_config(self, log_to_wandb: bool) -> MultiSAETrainingRunnerConfig:
        logger = LoggingConfig(**{**self.runner.get("logger", {}), "log_to_wandb": log_to_wandb})
        fields = {**self.runner, "logger": logger, "output_path": str(Path(self.output_dir) / "saes")}
        return MultiSAETrainingRunnerConfig(saes=self.saes, **fields)


def load_any_model(
    model_name: str, context_size: int, device: str, model_class_name: str = "HookedTransformer"
) -> Any:
    """An embedded model by name, or whatever SAELens's ``load_model`` loads."""
    if model_name in embedded.EMBEDDED_MODELS:
        return embedded.load_embedded_model(model_name, context_size, device)
    from sae_lens.load_model import load_model

    return load_model(model_class_name, model_name, device=device)


def resolve_model_and_dataset(
    model_name: str, dataset_path: str, context_size: int, device: str, training_tokens: int
) -> tuple[Any, Any]:
    """The overrides a SAELens runner needs for embedded names: (model or None, dataset or None)."""
    if model_name not in embedded.EMBEDDED_MODELS and dataset_path != embedded.SOTU:
        return None, None  # SAELens loads both by name
    model = load_any_model(model_name, context_size, device)
    if dataset_path != embedded.SOTU:
        return model, None
    dataset = embedded.embedded_dataset(dataset_path, model, context_size, "train")
    corpus_tokens = len(dataset) * context_size
    if training_tokens > corpus_tokens:
        _say(
            f"the corpus holds {corpus_tokens} tokens: training reads it {training_tokens / corpus_tokens:.1f} times"
        )
    return model, dataset


def held_out_text(spec: "CompareSpec", model: Any) -> Any:
    """What evaluation and calibration read: ``evaluation.held_out_dataset``, else the embedded corpus's
    held-out split, else the runner's ``dataset_path`` (then the training corpus: said on stderr)."""
    dataset_path = spec.evaluation.held_out_dataset or spec.setting("dataset_path")
    if dataset_path == embedded.SOTU:
        return embedded.embedded_dataset(dataset_path, model, spec.setting("context_size"), "held_out")
    if spec.evaluation.held_out_dataset is None:
        _say(
            f"evaluating on {dataset_path}, the training corpus; evaluation.held_out_dataset names held-out text"
        )
    return dataset_path


def _say(message: str) -> None:
    if rank() == 0:
        print(f"[sae-mc] {message}", file=sys.stderr, flush=True)


def run_compare(spec: CompareSpec, log_to_wandb: bool = False) -> dict[str, Any]:
    """Train ``spec.saes`` together, evaluate them and ``spec.evaluate_only``, write the results."""
    paths: dict[str, Path | dict[str, str]] = {}
    meta: dict[str, Any] = {"saes": sorted(spec.saes)}
    model = None
    if spec.saes:
        cfg = spec.multi_runner_config(log_to_wandb)
        joined = world_size() > 1  # under torchrun: data-parallel training, rank 0 evaluates
        rank_cfg = data_parallel.rank_config(cfg) if joined else cfg
        start = time.perf_counter()
        model, dataset = resolve_model_and_dataset(
            cfg.model_name, cfg.dataset_path, cfg.context_size, rank_cfg.device, cfg.training_tokens
        )
        if joined:
            dataset = data_parallel.rank_corpus(dataset, cfg)
        _say(f"model and corpus ready in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)  # SAELens does not seed the SAEs' initialisation itself
        runner_class = data_parallel.DataParallelMultiRunner if joined else MultiSAETrainingRunner
        runner = runner_class(rank_cfg, override_model=model, override_dataset=dataset)
        # A model loaded by name: its widths are known only now, still before training.
        preflight.check_compared_widths(preflight.config_dims(runner.model.cfg), spec.hook, spec.saes)
        if rank() > 0:
            runner.run()
            return {}
        with training_progress():
            runner.run()
        train_seconds = time.perf_counter() - start
        _say(f"trained {len(spec.saes)} SAEs on {cfg.training_tokens} tokens in {train_seconds:.0f} s")
        model = runner.model
        paths = {name: Path(cfg.output_path or "") / name for name in spec.saes}
        meta.update(
            train_seconds=train_seconds,
            training_tokens=cfg.training_tokens,
            train_tokens_per_second=cfg.training_tokens / train_seconds,
        )
    paths.update(spec.evaluate_only)
    return evaluate_all(spec, paths, model, meta, trained=set(spec.saes))


def run_eval(spec: CompareSpec, paths: list[Path]) -> dict[str, Any]:
    """Evaluate saved SAEs (and the config's ``evaluate_only`` entries) on its model, hook and held-out text."""
    return evaluate_all(spec, {**spec.evaluate_only, **{path.name: path for path in paths}}, None, {})


def evaluate_all(
    spec: CompareSpec,
    entries: dict[str, Any],
    model: Any,
    meta: dict[str, Any],
    trained: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Evaluate every entry (a directory, or ``{release, sae_id}``) on the same held-out text; write and
    print the results. ``trained``: the entries this run trained (the others set the "@k" L0, see
    :attr:`Evaluation.at_l0`)."""
    hook, device, context_size = spec.hook, spec.setting("device"), spec.setting("context_size")
    if model is None:
        model = load_any_model(
            spec.setting("model_name"), context_size, device, spec.setting("model_class_name")
        )
    held_out = held_out_text(spec, model)
    results: dict[str, dict[str, Any]] = {}
    activations = None
    for index, (name, entry) in enumerate(entries.items()):
        start = time.perf_counter()
        _say(f"evaluating {name} ({index + 1}/{len(entries)})")
        source = describe_source(entry)
        try:
            sae = _load(entry, device)
            _check_matches(sae, hook, model, source)
            if activations is None:  # from a store of its own: each SAE's metrics read a fresh one
                first = held_out_store(model, sae, held_out, spec)
                activations = held_out_activations(model, first, hook, spec.evaluation.held_out_batches)
            # A fresh store per SAE starts at the held-out text's first rows: every SAE (and every
            # @k copy) is measured on the same token batches.
            store = held_out_store(model, sae, held_out, spec)
            row = {
                "source": source,
                "architecture": _architecture(sae),
                "trained_k": trained_k(sae),
                **saelens_metrics(sae, model, store, spec.evaluation.eval_batches),
            }
            row.update(allocation_diagnostics(sae, activations))
            row.update(_metrics_at_k(sae, row, model, activations, spec, held_out))
            results[name] = row
            _say(f"evaluated {name} in {time.perf_counter() - start:.0f} s")
        except Exception as error:  # one bad entry must not stop the others
            results[name] = {
                "source": source,
                "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
            }
            _say(f"{name}: {results[name]['error']}")
    target = at_l0_target(spec.evaluation.at_l0, results, trained)
    if target is not None and activations is not None:
        _say(f"adaptive SAEs' @k columns at L0 = {target:g}")
        for name, entry in entries.items():
            row = results[name]
            adaptive = "error" not in row and row["architecture"] != "topk" and "at_k_l0_mean" in row
            if adaptive and row["trained_k"] != target:
                sae = _load(entry, device)
                if hasattr(sae, "threshold"):
                    row.update(_metrics_at_k(sae, row, model, activations, spec, held_out, target))
    out_dir = Path(spec.output_dir)
    measured_on = None
    if activations is not None:
        evaluation = spec.evaluation
        prompts = evaluation.eval_batches * evaluation.batch_prompts
        meta.update(eval_prompts=prompts, context_size=context_size, held_out_tokens=activations.shape[0])
        measured_on = (
            f"Every SAE on the same held-out text: SAELens's metrics on {prompts} prompts of {context_size} "
            f"tokens, the L0, MSE, dead/dense and density figures on {activations.shape[0]} tokens."
        )
    write_results(results, out_dir, spec.evaluation.note, measured_on)
    (out_dir / "run.json").write_text(json.dumps(meta, indent=1))
    if spec.evaluation.note:
        print(spec.evaluation.note + "\n")
    print(markdown_table(results) + (f"\n\n{measured_on}" if measured_on else ""))
    print(f"\nresults: {out_dir.resolve()}")
    return {"saes": results, "run": meta}


def run_calibrate(spec: CompareSpec, checkpoint: Path, out: Path) -> Path:
    """Calibrate a training checkpoint's thresholds exactly on held-out text; save as an inference SAE."""
    context_size = spec.setting("context_size")
    sae = load_training_checkpoint(checkpoint, device=spec.setting("device"))
    model = load_any_model(
        spec.setting("model_name"), context_size, spec.setting("device"), spec.setting("model_class_name")
    )
    store = held_out_store(model, sae, held_out_text(spec, model), spec)
    activations = held_out_activations(model, store, spec.hook, spec.evaluation.held_out_batches)
    calibrate_thresholds(sae, activations)
    sae.save_inference_model(out)
    print(f"calibrated on {activations.shape[0]} held-out tokens: {out.resolve()}")
    return out


def _load(entry: Any, device: str) -> SAE[Any]:
    if isinstance(entry, dict) and "release" in entry:
        return SAE.from_pretrained(entry["release"], entry["sae_id"], device=device)
    path = Path(entry["path"] if isinstance(entry, dict) else entry)
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"no SAE at {path} (cfg.json missing)")
    return SAE.load_from_disk(path, device=device)


def describe_source(entry: Any) -> str:
    """Where an SAE entry comes from: ``release/sae_id`` (a pretrained release or a hub repo id and
    folder, as ``SAE.from_pretrained`` takes them) or its directory."""
    if isinstance(entry, dict) and "release" in entry:
        return f"{entry['release']}/{entry['sae_id']} (from_pretrained)"
    return str(Path(entry["path"] if isinstance(entry, dict) else entry))


def _check_matches(sae: SAE[Any], hook: str, model: Any, source: str) -> None:
    sae_hook = sae.cfg.metadata.hook_name
    if sae_hook is not None and sae_hook != hook:
        raise ValueError(f"SAE hook {sae_hook!r} does not match the configured hook {hook!r} ({source})")
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    if d_model is not None and sae.cfg.d_in != d_model:
        raise ValueError(
            f"SAE d_in {sae.cfg.d_in} does not match the activations' width {d_model} ({source})"
        )


def held_out_store(model: Any, sae: SAE[Any], dataset: Any, spec: CompareSpec) -> ActivationsStore:
    metadata = sae.cfg.metadata
    metadata.hook_name = metadata.hook_name or spec.hook
    metadata.prepend_bos = (
        spec.setting("prepend_bos") if metadata.prepend_bos is None else metadata.prepend_bos
    )
    return ActivationsStore.from_sae(
        model,
        sae,
        dataset=dataset,
        context_size=spec.setting("context_size"),
        streaming=False,
        store_batch_size_prompts=spec.evaluation.batch_prompts,
        n_batches_in_buffer=2,
        train_batch_size_tokens=spec.setting("train_batch_size_tokens"),
        device=spec.setting("device"),
    )


def at_l0_target(at_l0: float | str | None, results: dict[str, dict[str, Any]], trained: Any) -> float | None:
    """The L0 of the adaptive SAEs' "@k" columns (:attr:`Evaluation.at_l0`), from the evaluated rows;
    None: each SAE's own k."""
    if isinstance(at_l0, str):
        row = results.get(at_l0)
        if row is None or "error" in row:
            raise ValueError(f"evaluation.at_l0: {at_l0!r} is not an evaluated SAE")
        fixed = row["trained_k"] if row["architecture"] == "topk" else None
        return float(fixed if fixed is not None else row["l0_mean"])
    if at_l0 is not None:
        return float(at_l0)
    fixed = {
        row["trained_k"]
        for name, row in results.items()
        if name not in trained and "error" not in row and row["architecture"] == "topk"
    }
    return fixed.pop() if len(fixed) == 1 else None


def _metrics_at_k(
    sae: SAE[Any],
    row: dict[str, Any],
    model: Any,
    activations: torch.Tensor,
    spec: CompareSpec,
    held_out: Any,
    target: float | None = None,
) -> dict[str, Any]:
    """The ``at_k_`` columns: an adaptive SAE recalibrated to mean L0 = ``target`` (default: its own k)
    on the evaluation text (:func:`~sae_mutual_choice.app.evaluate.at_k`); a TopK SAE's own figures; none
    for other SAEs."""
    k = trained_k(sae) if target is None else target
    if k is None or not (hasattr(sae, "threshold") or sae.cfg.architecture() == "topk"):
        return {}
    if hasattr(sae, "threshold"):
        calibrated = at_k(sae, activations, k)
        store = held_out_store(model, calibrated, held_out, spec)
        row = {
            **saelens_metrics(calibrated, model, store, spec.evaluation.eval_batches),
            **allocation_diagnostics(calibrated, activations),
        }
    return {f"at_k_{key}": row[key] for key in AT_K_METRICS}


def _architecture(sae: SAE[Any]) -> str:
    training = sae.cfg.metadata.training_architecture
    exported = sae.cfg.architecture()
    return exported if training in (None, exported) else f"{training} → {exported}"
