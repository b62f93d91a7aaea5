"""Data-parallel training on SAELens's runners: ``torchrun --nproc-per-node N -m sae_mutual_choice train|compare CONFIG``.

Every rank runs SAELens's runner (``LanguageModelSAETrainingRunner`` for ``train``,
``MultiSAETrainingRunner`` for ``compare``) on its own shard of the corpus with
``train_batch_size_tokens / N`` tokens a step, for the same number of steps as one process on the
whole batch. This package's SAEs train with ``data_parallel`` on, so selection and running
statistics are the joined batch's exactly; every SAE is wrapped in ``DistributedDataParallel``,
which averages the gradients. Beyond that, the trainers here (subclasses of SAELens's) make

- the dead-latent counters (AuxK's dead mask) and the activation-norm scaling factor the joined
  batch's (one ``all_reduce`` each);
- rank 0 alone log and write: before every checkpoint and the final export all ranks join the
  calibration sample (:func:`~sae_mutual_choice.fast.thresholds.calibrate_over_ranks`); a checkpoint is
  written to ``NAME.partial``, each rank adds its activation store's position, and rank 0 renames
  it to ``NAME`` once every rank has written. A rank that fails therefore never leaves a directory
  that looks like a complete checkpoint, and, unlike one process, an interrupted run writes no
  checkpoint of its own (the other ranks may be gone): the last complete one resumes.
"""

import contextlib
import dataclasses
import inspect
import re
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens import llm_sae_training_runner as single_runner_module
from sae_lens import multi_sae_training_runner as multi_runner_module
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner
from sae_lens.training import multi_sae_trainer, sae_trainer
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sae_mutual_choice.fast.collectives import (
    barrier,
    local_rank,
    min_over_ranks,
    rank,
    rank_0_value,
    sum_over_ranks,
    world_size,
)
from sae_mutual_choice.fast.thresholds import calibrate_over_ranks
from sae_mutual_choice.upstream.mutual_choice_sae import MutualChoiceTrainingSAE

# torch >= 2.13 names the option forward_sync_buffers and deprecates broadcast_buffers.
NO_FORWARD_BUFFER_SYNC: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)
# SAELens architectures whose selection spans the batch: per rank, each rank would get its own budget.
PER_BATCH_ARCHITECTURES = {"batchtopk": "mutual_choice", "matryoshka_batchtopk": None}


def trained_saes(cfg: Any) -> dict[str, Any]:
    """The SAE configs a runner config trains, by name (``sae`` for a single-SAE config)."""
    return dict(cfg.saes) if hasattr(cfg, "saes") else {"sae": cfg.sae}


def check_data_parallel(cfg: Any, n_ranks: int) -> None:
    """Raise ``ValueError`` for a runner config (single- or multi-SAE) that cannot train exactly on ``n_ranks`` ranks."""
    batch = cfg.train_batch_size_tokens
    if batch % n_ranks:
        raise ValueError(
            f"train_batch_size_tokens must be divisible by the number of ranks ({n_ranks}) for "
            f"data-parallel training, got {batch}"
        )
    if getattr(cfg, "compile_sae", False):
        raise ValueError("compile_sae must be false for data-parallel training")
    for name, sae in trained_saes(cfg).items():
        field = name if name == "sae" else f"saes.{name}"
        architecture = sae.architecture()
        if architecture in PER_BATCH_ARCHITECTURES:
            instead = PER_BATCH_ARCHITECTURES[architecture]
            hint = f"; {instead} selects the same pairs exactly across ranks" if instead else ""
            raise ValueError(
                f"{field}.architecture {architecture!r} selects over the batch and would select per "
                f"rank under data parallelism{hint}"
            )
        if sae.normalize_activations == "covariance_whitening":
            raise ValueError(
                f"{field}.normalize_activations 'covariance_whitening' is not supported for data-parallel "
                "training (its statistics would be per rank); use 'expected_average_only_in' or 'none'"
            )


def rank_config(cfg: Any) -> Any:
    """This rank's runner config (single- or multi-SAE): its share of each batch, the same number of
    steps, its device, this package's SAEs with ``data_parallel`` on, logging on rank 0 only."""
    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    local_batch = cfg.train_batch_size_tokens // world_size()
    saes = {
        name: dataclasses.replace(sae, data_parallel=True) if hasattr(sae, "data_parallel") else sae
        for name, sae in trained_saes(cfg).items()
    }
    device = f"cuda:{local_rank()}" if cfg.device.startswith("cuda") else cfg.device
    logger = dataclasses.replace(cfg.logger, log_to_wandb=cfg.logger.log_to_wandb and rank() == 0)
    local = dataclasses.replace(
        cfg,
        **({"saes": saes} if hasattr(cfg, "saes") else saes),
        train_batch_size_tokens=local_batch,
        training_tokens=steps * local_batch,
        device=device,
        llm_device=device if cfg.llm_device == cfg.device else cfg.llm_device,
        logger=logger,
    )
    # SAELens makes the checkpoint directory unique with a random suffix, drawn again by replace():
    # every rank writes its part of a checkpoint into rank 0's directory.
    local.checkpoint_path = rank_0_value(cfg.checkpoint_path)
    return local


def rank_corpus(dataset: Any, cfg: Any) -> Any:
    """This rank's disjoint shard of the corpus: ``dataset`` (map-style or streaming), else ``cfg.dataset_path``."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    if dataset is None:
        dataset = load_dataset(cfg.dataset_path, split="train", streaming=cfg.streaming)
    return split_dataset_by_node(dataset, rank=rank(), world_size=world_size())


class TrainingStep(nn.Module):
    """The SAE's training step as a module's ``forward``, for ``DistributedDataParallel`` to wrap."""

    def __init__(self, sae: Any):
        super().__init__()
        self.sae = sae

    def forward(self, step_input: Any) -> Any:
        return type(self.sae).training_forward_pass(self.sae, step_input)


class DataParallelTrainer(SAETrainer):  # type: ignore[type-arg]
    """SAELens's trainer with DDP gradients, joined dead-latent counters and scaling, and rank-0 checkpoints."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.coordinated = False  # True under DataParallelMultiTrainer, which writes the checkpoints
        device_ids = [self.sae.device] if self.sae.device.type == "cuda" else None
        # No buffer sync in forward: each rank keeps its own calibration sample (empty when DDP
        # syncs once at start), and the other buffers agree by construction.
        self.ddp = DistributedDataParallel(
            TrainingStep(self.sae), device_ids=device_ids, **NO_FORWARD_BUFFER_SYNC
        )
        estimate = self.activation_scaler.estimate_scaling_factor

        def estimate_joined(*args: Any, **kwargs: Any) -> None:
            estimate(*args, **kwargs)
            factor = self.activation_scaler.scaling_factor
            assert factor is not None
            # factor = sqrt(d_in) / mean norm; the joined mean norm is the mean of the ranks' (equal sizes).
            inverse = torch.tensor(1 / factor, dtype=torch.float64, device=self.sae.device)
            self.activation_scaler.scaling_factor = float(world_size() / sum_over_ranks(inverse))

        self.activation_scaler.estimate_scaling_factor = estimate_joined  # type: ignore[method-assign]

    def _train_step(self, sae: Any, sae_in: torch.Tensor) -> Any:
        # The parent calls sae.training_forward_pass(step_input=...); route it through DDP for this step.
        sae.training_forward_pass = lambda step_input: self.ddp(step_input)
        try:
            output = super()._train_step(sae, sae_in)
        finally:
            del sae.training_forward_pass
        # Steps since a latent last fired anywhere: the smallest count over ranks.
        self.n_forward_passes_since_fired = min_over_ranks(self.n_forward_passes_since_fired)
        return output

    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        if self.coordinated:  # one SAE's part of a multi-SAE checkpoint, written on rank 0 only
            super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)
            return
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        write_checkpoint(
            [self.sae],
            base,
            checkpoint_name,
            lambda name: SAETrainer.save_checkpoint(self, name, base, wandb_aliases),
            self.save_checkpoint_fn,
        )

    def set_final_sae_metadata(self) -> None:
        # The SAE's metadata (L0, dead latents) describes the joined batches, not rank 0's.
        local = self.act_freq_scores, self.n_frac_active_samples
        self.act_freq_scores = sum_over_ranks(self.act_freq_scores)
        self.n_frac_active_samples *= world_size()
        try:
            super().set_final_sae_metadata()
        finally:
            self.act_freq_scores, self.n_frac_active_samples = local


class DataParallelMultiTrainer(MultiSAETrainer):
    """SAELens's multi-SAE coordinator over :class:`DataParallelTrainer` s, with rank-0 checkpoints."""

    def __init__(self, *args: Any, **kwargs: Any):
        with mock.patch.object(multi_sae_trainer, "SAETrainer", DataParallelTrainer):
            super().__init__(*args, **kwargs)
        for trainer in self.trainers.values():
            trainer.coordinated = True  # type: ignore[attr-defined]

    def save_checkpoint(self, checkpoint_name: str, wandb_aliases: list[str] | None = None) -> None:
        write_checkpoint(
            list(self.saes.values()),
            self.cfg.checkpoint_path,
            checkpoint_name,
            lambda name: MultiSAETrainer.save_checkpoint(self, name, wandb_aliases),
            self.save_checkpoint_fn,
        )


def write_checkpoint(
    saes: list[Any],
    base: Path | str | None,
    name: str,
    write: Callable[[str], None],
    write_rank_part: Callable[..., None] | None,
) -> None:
    """Write a checkpoint; a collective: the joined calibration, then rank 0's files, atomically.

    ``write(name)``: SAELens's own checkpoint writer, called on rank 0 with ``NAME.partial`` (it
    calls ``write_rank_part``, the runner's hook, itself); the other ranks call
    ``write_rank_part(checkpoint_path=...)`` to add their activation store's position. Once every
    rank has written, rank 0 renames ``NAME.partial`` to ``NAME``. SAELens names checkpoints by the
    tokens trained on, which a rank's trainer counts for its slice only: the name counts all ranks'.
    """
    for sae in saes:
        if isinstance(sae, MutualChoiceTrainingSAE):
            calibrate_over_ranks(sae)
    name = re.sub(r"\d+$", lambda digits: str(int(digits.group()) * world_size()), name)
    if base is None:  # a wandb-only checkpoint: rank 0 uploads it
        if rank() == 0:
            write(name)
        return
    partial_dir, final_dir = Path(base) / f"{name}.partial", Path(base) / name
    try:
        if rank() == 0:
            write(partial_dir.name)
        elif write_rank_part is not None:
            write_rank_part(checkpoint_path=partial_dir)
        barrier()  # every rank has written its part
    except BaseException:
        if rank() == 0:  # best effort: a rank killed outright leaves NAME.partial, never NAME
            shutil.rmtree(partial_dir, ignore_errors=True)
        raise
    if rank() == 0:
        if final_dir.exists():
            shutil.rmtree(final_dir)
        partial_dir.rename(final_dir)
    barrier()


def store_file(checkpoint_path: Path | str) -> Path:
    """Where a rank other than 0 keeps its activation store's position in a checkpoint."""
    return Path(checkpoint_path) / f"activations_store_rank{rank()}.safetensors"


class RankRunnerMixin:
    """What both runners do on a rank: per-rank store positions, rank-0 writes, no interruption checkpoint."""

    activations_store: Any

    def _resume_own_store_position(self) -> None:
        if rank() > 0:
            store = self.activations_store
            store.load_from_checkpoint = lambda path: store.load(str(store_file(path)))

    @contextlib.contextmanager
    def _data_parallel_trainers(self, runner_module: Any, name: str, trainer_class: type) -> Iterator[None]:
        with contextlib.ExitStack() as patches:
            patches.enter_context(mock.patch.object(runner_module, name, trainer_class))
            if rank() > 0:  # one progress bar: rank 0's
                for module in (sae_trainer, multi_sae_trainer):
                    patches.enter_context(mock.patch.object(module, "tqdm", partial(tqdm, disable=True)))
            yield

    def _write_rank_part(self, checkpoint_path: Path | None, write: Callable[[Path], None]) -> None:
        if checkpoint_path is None:
            return
        if rank() == 0:
            write(checkpoint_path)
        else:
            checkpoint_path.mkdir(parents=True, exist_ok=True)
            self.activations_store.save(str(store_file(checkpoint_path)))

    @staticmethod
    def _export_on_rank_0(saes: list[Any], write: Callable[[], None]) -> None:
        for sae in saes:
            if isinstance(sae, MutualChoiceTrainingSAE):
                calibrate_over_ranks(sae)
        if rank() == 0:
            write()
        barrier()


class DataParallelRunner(RankRunnerMixin, LanguageModelSAETrainingRunner):  # type: ignore[type-arg]
    """SAELens's single-SAE runner on one rank; see the module docstring. Pass the corpus already sharded."""

    def __init__(self, cfg: Any, **overrides: Any):
        super().__init__(cfg, **overrides)
        self._resume_own_store_position()

    def run(self) -> Any:
        with self._data_parallel_trainers(single_runner_module, "SAETrainer", DataParallelTrainer):
            return super().run()

    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        return trainer.fit()  # no checkpoint on interruption: the other ranks may be gone

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        self._write_rank_part(checkpoint_path, super().save_checkpoint)

    def save_final_sae(
        self, sae: Any, output_path: str, log_feature_sparsity: torch.Tensor | None = None
    ) -> None:
        write = partial(super().save_final_sae, sae, output_path, log_feature_sparsity)
        self._export_on_rank_0([sae], write)


class DataParallelMultiRunner(RankRunnerMixin, MultiSAETrainingRunner):
    """SAELens's multi-SAE runner on one rank; see the module docstring. Pass the corpus already sharded."""

    def __init__(self, cfg: Any, **overrides: Any):
        super().__init__(cfg, **overrides)
        self._resume_own_store_position()

    def run(self) -> Any:
        with self._data_parallel_trainers(multi_runner_module, "MultiSAETrainer", DataParallelMultiTrainer):
            return super().run()

    def _run_with_interruption_handling(self, trainer: Any) -> Any:
        return trainer.fit()  # no checkpoint on interruption: the other ranks may be gone

    def _save_runner_checkpoint_files(self, checkpoint_path: Path | None) -> None:
        self._write_rank_part(checkpoint_path, super()._save_runner_checkpoint_files)

    def _save_final_outputs(self, saes: dict[str, Any], trainer: Any) -> None:
        self._export_on_rank_0(list(saes.values()), partial(super()._save_final_outputs, saes, trainer))
