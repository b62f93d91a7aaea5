"""Training checkpoints of Mutual and Feature Choice SAEs: recognising one, and loading it intact.

A checkpoint is SAELens's ``save_model`` output: ``cfg.json`` (the training config) and
``sae_weights.safetensors`` with the parameters and the persistent training buffers (running
statistics, several in float64: the capacity carry, threshold estimates and their weights).
SAELens's ``load_from_disk`` casts every stored tensor to ``cfg.dtype``, which would round those
buffers (bf16 keeps 8 bits of mantissa); :func:`load_training_checkpoint` keeps each buffer's
stored dtype.
"""

import json
from pathlib import Path
from typing import Any

from sae_lens.registry import get_sae_training_class

CALIBRATABLE = ("mutual_choice", "feature_choice")


def check_training_checkpoint(path: Path) -> dict[str, Any]:
    """Raise ``ValueError`` unless ``path`` is a Mutual/Feature Choice training checkpoint; its config."""
    cfg_path = path / "cfg.json"
    if not cfg_path.is_file():
        raise ValueError(f"no saved SAE at {path} (no cfg.json); calibrate takes a training checkpoint")
    cfg = json.loads(cfg_path.read_text())
    architecture = cfg.get("architecture")
    if architecture in CALIBRATABLE:
        return cfg
    trained_as = (cfg.get("metadata") or {}).get("training_architecture")
    if trained_as in CALIBRATABLE:
        raise ValueError(
            f"{path} is an exported inference SAE ({architecture}, trained as {trained_as}); calibrate "
            "needs the training checkpoint, which the runner writes under checkpoint_path when "
            "n_checkpoints > 0 or save_final_checkpoint: true"
        )
    raise ValueError(
        f"{path}: calibrate takes a training checkpoint of {list(CALIBRATABLE)}, got architecture {architecture!r}"
    )


def load_training_checkpoint(path: Path, device: str = "cpu") -> Any:
    """A training SAE from a checkpoint directory, parameters in ``cfg.dtype``, buffers in their stored dtypes."""
    cfg = {**json.loads((path / "cfg.json").read_text()), "device": device}
    sae_class, config_class = get_sae_training_class(cfg["architecture"])
    sae = sae_class(config_class.from_dict(cfg))
    sae.load_weights_from_checkpoint(path)  # copies into the registered buffers, keeping their dtypes
    return sae
