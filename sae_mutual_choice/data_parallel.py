"""Data-parallel training on SAELens's runner: ``torchrun --nproc-per-node N -m sae_mutual_choice train CONFIG``.

Every rank runs SAELens's ``LanguageModelSAETrainingRunner`` on its own shard of the corpus with
``train_batch_size_tokens / N`` tokens a step, for the same number of steps as one process on the
whole batch. The SAE is one of this package's with ``data_parallel`` on, so selection and running
statistics are the joined batch's exactly, and it is wrapped in ``DistributedDataParallel``, which
averages the gradients. Beyond that, the trainer here (a subclass of SAELens's) makes

- the dead-latent counters (AuxK's dead mask) and the activation-norm scaling factor the joined
  batch's (one ``all_reduce`` each);
- rank 0 alone log and write: before every checkpoint and the final export all ranks join the
  calibration sample (:func:`~sae_mutual_choice.thresholds.calibrate_over_ranks`); a checkpoint is
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
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens import llm_sae_training_runner as sae_lens_runner
from sae_lens.training import sae_trainer
from sae_lens.training.sae_trainer import SAETrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sae_mutual_choice.collectives import (
    barrier,
    local_rank,
    min_over_ranks,
    rank,
    sum_over_ranks,
    world_size,
)
from sae_mutual_choice.thresholds import JumpReLUExportMixin, calibrate_over_ranks

# torch >= 2.13 names the option forward_sync_buffers and deprecates broadcast_buffers.
NO_FORWARD_BUFFER_SYNC: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)
# SAELens architectures whose selection spans the batch: per rank, each rank would get its own budget.
PER_BATCH_ARCHITECTURES = {"batchtopk": "mutual_choice", "matryoshka_batchtopk": None}


def check_data_parallel(cfg: LanguageModelSAERunnerConfig[Any], n_ranks: int) -> None:
    """Raise ``ValueError`` for a runner config that cannot train on ``n_ranks`` ranks exactly."""
    batch = cfg.train_batch_size_tokens
    if batch % n_ranks:
        raise ValueError(
            f"train_batch_size_tokens must be divisible by the number of ranks ({n_ranks}) for "
            f"data-parallel training, got {batch}"
        )
    architecture = cfg.sae.architecture()
    if architecture in PER_BATCH_ARCHITECTURES:
        instead = PER_BATCH_ARCHITECTURES[architecture]
        hint = f"; {instead} selects the same pairs exactly across ranks" if instead else ""
        raise ValueError(
            f"sae.architecture {architecture!r} selects over the batch and would select per rank "
            f"under data parallelism{hint}"
        )
    if cfg.compile_sae:
        raise ValueError("compile_sae must be false for data-parallel training")
    if cfg.sae.normalize_activations == "covariance_whitening":
        raise ValueError(
            "sae.normalize_activations 'covariance_whitening' is not supported for data-parallel training "
            "(its statistics would be per rank); use 'expected_average_only_in' or 'none'"
        )


def rank_config(cfg: LanguageModelSAERunnerConfig[Any]) -> LanguageModelSAERunnerConfig[Any]:
    """This rank's runner config: its share of each batch, the same number of steps, its device, logging on rank 0."""
    n_ranks = world_size()
    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    local_batch = cfg.train_batch_size_tokens // n_ranks
    sae = dataclasses.replace(cfg.sae, data_parallel=True) if hasattr(cfg.sae, "data_parallel") else cfg.sae
    device = f"cuda:{local_rank()}" if cfg.device.startswith("cuda") else cfg.device
    logger = dataclasses.replace(cfg.logger, log_to_wandb=cfg.logger.log_to_wandb and rank() == 0)
    return dataclasses.replace(
        cfg,
        sae=sae,
        train_batch_size_tokens=local_batch,
        training_tokens=steps * local_batch,
        device=device,
        llm_device=device if cfg.llm_device == cfg.device else cfg.llm_device,
        logger=logger,
    )


def shard(dataset: Any) -> Any:
    """This rank's disjoint shard of a Hugging Face dataset (map-style or streaming)."""
    from datasets.distributed import split_dataset_by_node

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
            inverse = torch.tensor(1 / factor, dtype=torch.float64)
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
        if isinstance(self.sae, JumpReLUExportMixin):
            calibrate_over_ranks(self.sae)
        # SAELens names checkpoints by the tokens trained on; this trainer counts one rank's.
        checkpoint_name = re.sub(r"\d+$", lambda m: str(int(m.group()) * world_size()), checkpoint_name)
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if base is None:  # a wandb-only checkpoint: rank 0 uploads it
            if rank() == 0:
                super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)
            return
        partial, final = Path(base) / f"{checkpoint_name}.partial", Path(base) / checkpoint_name
        try:
            if rank() == 0:
                super().save_checkpoint(partial.name, base, wandb_aliases)
            elif self.save_checkpoint_fn is not None:
                self.save_checkpoint_fn(checkpoint_path=partial)
            barrier()  # every rank has written its part
        except BaseException:
            if rank() == 0:  # best effort: a rank killed outright leaves NAME.partial, never NAME
                shutil.rmtree(partial, ignore_errors=True)
            raise
        if rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
        barrier()

    def set_final_sae_metadata(self) -> None:
        # The SAE's metadata (L0, dead latents) describes the joined batches, not rank 0's.
        local = self.act_freq_scores, self.n_frac_active_samples
        self.act_freq_scores = sum_over_ranks(self.act_freq_scores)
        self.n_frac_active_samples *= world_size()
        try:
            super().set_final_sae_metadata()
        finally:
            self.act_freq_scores, self.n_frac_active_samples = local


def store_file(checkpoint_path: Path | str) -> Path:
    """Where a rank other than 0 keeps its activation store's position in a checkpoint."""
    return Path(checkpoint_path) / f"activations_store_rank{rank()}.safetensors"


class DataParallelRunner(LanguageModelSAETrainingRunner):  # type: ignore[type-arg]
    """SAELens's runner on one rank; see the module docstring. Pass the corpus already sharded."""

    def __init__(self, cfg: LanguageModelSAERunnerConfig[Any], **overrides: Any):
        super().__init__(cfg, **overrides)
        if rank() > 0:  # resume each rank's store from its own position
            store = self.activations_store
            store.load_from_checkpoint = lambda path: store.load(str(store_file(path)))  # type: ignore[method-assign]

    def run(self) -> Any:
        with contextlib.ExitStack() as patches:
            patches.enter_context(mock.patch.object(sae_lens_runner, "SAETrainer", DataParallelTrainer))
            if rank() > 0:  # one progress bar: rank 0's
                patches.enter_context(mock.patch.object(sae_trainer, "tqdm", partial(tqdm, disable=True)))
            return super().run()

    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        return trainer.fit()  # no checkpoint on interruption: the other ranks may be gone

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        if checkpoint_path is None:
            return
        if rank() == 0:
            super().save_checkpoint(checkpoint_path)
        else:
            checkpoint_path.mkdir(parents=True, exist_ok=True)
            self.activations_store.save(str(store_file(checkpoint_path)))

    def save_final_sae(
        self, sae: Any, output_path: str, log_feature_sparsity: torch.Tensor | None = None
    ) -> None:
        exporter: Any = sae
        if isinstance(exporter, JumpReLUExportMixin):
            calibrate_over_ranks(exporter)
        if rank() == 0:
            super().save_final_sae(sae, output_path, log_feature_sparsity)
        barrier()
