"""What a user sees while ``sae-mc`` runs: a training bar that moves every step, and only warnings
that a user can act on.

SAELens's trainers move their bar every 100 steps (a short run shows 0 % throughout) and read
every loss on the host when they do. :func:`training_progress` moves it every step, in tokens,
so tqdm shows tokens/s and an ETA; the losses are read at most every ``LOSS_INTERVAL_S`` seconds
(one host-device synchronisation then, none in between).
"""

import contextlib
import logging
import re
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer

LOSS_INTERVAL_S = 5.0

# Warnings SAELens raises that say nothing a user of these commands can act on, matched by message.
NOISE = (
    # SAELens copies token rows with torch.tensor(tensor) in its store.
    (r"To copy construct from a tensor", r"sae_lens\.training\.activations_store"),
    # SAELens compares the dataset's number of sequences with the number of training tokens.
    (r"The training dataset contains fewer samples \(\d+\) than the number of samples", r"sae_lens\."),
    # We load models without weight processing, as SAELens does; its reminder to do so says nothing new.
    (r"\s*This SAE has non-empty model_from_pretrained_kwargs", r"sae_lens\."),
)
# Logged by SAELens's runners when they are given the model and corpus that our config names.
OVERRIDE_NOTICE = re.compile(
    r"(override_(model|dataset) overrides cfg\.\w+=.*|You just passed in a (model|dataset) which will "
    r"override .*)not be reproducible"
)


class _OverrideNoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not OVERRIDE_NOTICE.search(record.getMessage())


def quiet_known_noise() -> None:
    """Filter the warnings in :data:`NOISE` and SAELens's override notice; every other warning passes."""
    for message, module in NOISE:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
    sae_lens_logger = logging.getLogger("sae_lens")
    if not any(isinstance(f, _OverrideNoticeFilter) for f in sae_lens_logger.filters):
        sae_lens_logger.addFilter(_OverrideNoticeFilter())


def _loss_summary(outputs: Any) -> str:
    """Losses of one step's output, or of each SAE's output (a dict by name) as ``name mse``."""

    def show(value: Any) -> str:
        return f"{float(torch.as_tensor(value).detach()):.4g}"

    if isinstance(outputs, dict):
        return " · ".join(f"{name} {show(out.losses['mse_loss'])}" for name, out in outputs.items())
    return " · ".join(f"{name} {show(value)}" for name, value in outputs.losses.items())


@contextlib.contextmanager
def training_progress() -> Iterator[None]:
    """While open, SAELens's single- and multi-SAE training bars move every step (see the module docstring)."""
    last_read = [0.0]

    def update(trainer: Any, outputs: Any, pbar: Any, update_interval: int = 100) -> None:  # noqa: ARG001
        if pbar.unit != "tok":
            pbar.unit, pbar.unit_scale, pbar.desc = "tok", True, "training"
        now = time.monotonic()
        if now - last_read[0] >= LOSS_INTERVAL_S:
            last_read[0] = now
            pbar.set_postfix_str(f"step {trainer.n_training_steps} | {_loss_summary(outputs)}", refresh=False)
        pbar.update(trainer.cfg.train_batch_size_samples)

    originals = {cls: cls._update_pbar for cls in (SAETrainer, MultiSAETrainer)}
    try:
        for cls in originals:
            cls._update_pbar = update  # type: ignore[method-assign]
        yield
    finally:
        for cls, original in originals.items():
            cls._update_pbar = original  # type: ignore[method-assign]
