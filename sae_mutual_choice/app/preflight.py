"""Checks that run before the model loads: runner settings, output paths, and the hook's width.

A run that would be meaningless (no training step, a negative learning rate), that could not
save what it trained (an output path under a regular file), or whose SAE cannot read the hook
(``d_in`` against the hook's width in the model's config) fails here with a ``ValueError``
naming the key and its allowed values, before anything is loaded or written.
"""

import math
import os
from pathlib import Path
from typing import Any

from sae_mutual_choice.upstream.adaptive_allocation import check_integer, check_range

# Runner fields (LanguageModelSAERunnerConfig and MultiSAETrainingRunnerConfig share them):
# name -> (low, high, integer, low_open, high_open). None values are left to SAELens's defaults.
RUNNER_RANGES: dict[str, tuple[float, float, bool, bool, bool]] = {
    "context_size": (1, math.inf, True, False, False),
    "n_batches_in_buffer": (1, math.inf, True, False, False),
    "store_batch_size_prompts": (1, math.inf, True, False, False),
    "train_batch_size_tokens": (1, math.inf, True, False, False),
    "activations_mixing_fraction": (0, 1, False, False, False),
    "adam_beta1": (0, 1, False, False, True),
    "adam_beta2": (0, 1, False, False, True),
    "lr": (0, math.inf, False, True, False),
    "lr_end": (0, math.inf, False, False, False),
    "lr_warm_up_steps": (0, math.inf, True, False, False),
    "lr_decay_steps": (0, math.inf, True, False, False),
    "n_restart_cycles": (1, math.inf, True, False, False),
    "dead_feature_window": (1, math.inf, True, False, False),
    "feature_sampling_window": (1, math.inf, True, False, False),
    "dead_feature_threshold": (0, 1, False, False, False),
    "n_eval_batches": (0, math.inf, True, False, False),
    "eval_batch_size_prompts": (1, math.inf, True, False, False),
    "n_checkpoints": (0, math.inf, True, False, False),
    "n_batches_for_norm_estimate": (1, math.inf, True, False, False),
}


def check_runner_settings(settings: Any, prefix: str = "") -> None:
    """Ranges of the runner fields in :data:`RUNNER_RANGES`, and at least one training step."""
    for name, (low, high, integer, low_open, high_open) in RUNNER_RANGES.items():
        value = getattr(settings, name, None)
        if value is None:
            continue
        if integer:
            check_integer(prefix + name, value, int(low))
        else:
            check_range(prefix + name, value, low, high, low_open=low_open, high_open=high_open)
    batch = settings.train_batch_size_tokens
    if not isinstance(settings.training_tokens, int) or settings.training_tokens < batch:
        raise ValueError(
            f"{prefix}training_tokens must be an integer >= train_batch_size_tokens={batch} "
            f"(at least one training step), got {settings.training_tokens!r}"
        )


def check_sae_settings(sae_cfg: Any, prefix: str) -> None:
    """Widths and ``k`` of any architecture's config (SAELens's own included): ``d_in``, ``d_sae`` >= 1,
    ``k`` in (0, d_sae] where the architecture has one."""
    check_integer(f"{prefix}d_in", sae_cfg.d_in, 1)
    check_integer(f"{prefix}d_sae", sae_cfg.d_sae, 1)
    k = getattr(sae_cfg, "k", None)
    if k is not None:
        check_range(f"{prefix}k", k, 0, sae_cfg.d_sae, low_open=True)


def check_writable_dir(path: str | Path, key: str) -> None:
    """Raise unless ``path`` is, or can be created as, a directory this process can write into."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{key}: {target} is a file; it must be a directory (or not exist yet)")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{key}: cannot create {target}, because {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}: cannot write under {existing} (permission denied)")


def hook_width(dims: dict[str, int], hook_name: str, head_index: int | None = None) -> int | None:
    """The last dimension of ``hook_name``'s activations (as SAELens's store yields them), or None if unknown.

    ``dims`` has the model's ``d_model``, ``d_mlp``, ``n_heads``, ``d_head`` and ``n_layers``.
    Raises ``ValueError`` for a block index the model does not have.
    """
    parts = hook_name.split(".")
    if parts[0] == "blocks":
        if len(parts) < 3 or not parts[1].isdigit():
            return None
        if int(parts[1]) >= dims["n_layers"]:
            raise ValueError(
                f"hook_name {hook_name!r}: the model has {dims['n_layers']} blocks "
                f"(blocks.0 .. blocks.{dims['n_layers'] - 1})"
            )
        parts = parts[2:]
    leaf = ".".join(parts)
    if leaf in ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear"):
        return dims["d_mlp"]
    if leaf == "attn.hook_z":  # SAELens flattens the heads, unless it reads one head
        return dims["d_head"] if head_index is not None else dims["n_heads"] * dims["d_head"]
    residual = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
    if leaf in (*residual, "hook_embed", "hook_pos_embed"):
        return dims["d_model"]
    return None


def config_dims(cfg: Any) -> dict[str, int]:
    """The widths :func:`hook_width` needs, from a ``HookedTransformerConfig``."""
    return {name: int(getattr(cfg, name)) for name in ("n_layers", "d_model", "d_head", "n_heads", "d_mlp")}


def check_d_in(
    dims: dict[str, int], hook_name: str, d_in: int, key: str, head_index: int | None = None
) -> None:
    """Raise ``ValueError`` if ``d_in`` differs from the width of ``hook_name`` in a model with ``dims``."""
    width = hook_width(dims, hook_name, head_index)
    if width is not None and d_in != width:
        raise ValueError(f"{key} must equal the width of {hook_name} ({width} in this model), got {d_in}")


def check_compared_widths(dims: dict[str, int], hook_name: str, saes: dict[str, Any]) -> None:
    """:func:`check_d_in` for every SAE of a compare (``saes``: name -> training SAE config)."""
    for name, sae in saes.items():
        check_d_in(dims, hook_name, sae.d_in, f"saes.{name}.d_in")
