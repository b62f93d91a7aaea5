"""Host-device synchronisations per steady-state training step, counted on CPU.

A ``TorchDispatchMode`` records the operators that make the host wait for a CUDA device: reading a
tensor's value (``.item()``, ``float()``, ``int()``, ``bool()``: ``aten._local_scalar_dense``),
outputs whose size depends on values (``nonzero``, ``masked_select``, ``unique``, boolean-mask
indexing, ``repeat_interleave`` without ``output_size``, ``bincount`` without ``minlength``). On CPU
nothing waits, but the same operators run, so the count is the one a CUDA step would make
(``.tolist()`` of a CPU tensor bypasses the dispatcher and is not seen). One step is SAELens's
``training_forward_pass`` + backward (Adam runs between steps, uncounted: on CUDA its step counters
live on the host), B tokens, a few dead latents; the figure is the mean over steps 3–5.

    python benchmarks/syncs.py [--batch 512]

Prints one row per architecture, step and aux loss, with the operators that were counted.
"""

import argparse
import warnings
from collections import Counter
from typing import Any

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from torch.utils._python_dispatch import TorchDispatchMode

import sae_mutual_choice  # noqa: F401  (registers the architectures)
from sae_mutual_choice.fast.host_reads import sync_free

ALWAYS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class SyncCounter(TorchDispatchMode):
    """Counts the operators (by name) that synchronise the host with a CUDA device."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name.removeprefix("aten::")
        if (
            name in ALWAYS
            or (name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3)
            or (name == "bincount" and not kwargs.get("minlength", args[2] if len(args) > 2 else 0))
        ):
            self.counts[name] += 1
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in (args[1] or [])
        ):
            self.counts[f"{name} (boolean mask)"] += 1
        return func(*args, **kwargs)


def training_sae(architecture: str, sparse: bool, aux: str, **more: Any) -> Any:
    """The SAE whose steps are counted: d_in 64, width 1024, k 16, and ``more`` fields (SAELens's
    architectures take no ``sparse``/``aux``)."""
    sae_class, config_class = get_sae_training_class(architecture)
    fields: dict[str, Any] = {
        "d_in": 64,
        "d_sae": 1024,
        "k": 16 if architecture in ("topk", "token_choice") else 16.0,
    }
    if architecture in ("token_choice", "mutual_choice", "feature_choice"):
        fields.update(sparse_training=sparse, aux_loss=aux)
    return sae_class(config_class(**fields, **more))


def count_syncs(
    architecture: str,
    sparse: bool,
    aux: str,
    batch: int,
    steps: int = 5,
    device: str = "cpu",
) -> Counter[str]:
    """The sync operators of steps 3.. of ``steps`` (summed), for one configuration.

    On CUDA, each step also runs under ``torch.cuda.set_sync_debug_mode("warn")``, and the
    synchronisations CUDA itself reports are counted as ``"cuda (debug mode)"``.
    """
    torch.manual_seed(0)
    sae = training_sae(architecture, sparse, aux).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    dead = torch.arange(sae.cfg.d_sae, device=device) % 20 == 0
    total: Counter[str] = Counter()
    for step in range(steps):
        x = torch.randn(batch, sae.cfg.d_in, device=device)
        counter = SyncCounter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with sync_free(), counter:  # the path an accelerator takes
                    out = sae.training_forward_pass(TrainStepInput(x, {"aux_loss": 1.0}, dead, step, False))
                    out.loss.backward()
            finally:
                if device.startswith("cuda"):
                    torch.cuda.set_sync_debug_mode("default")
        cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
        if cuda_syncs:
            counter.counts["cuda (debug mode)"] += cuda_syncs
        optimizer.step()  # not counted: on CUDA, Adam's step counters live on the host
        optimizer.zero_grad()
        if step >= 2:
            total += counter.counts
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument(
        "--device", default="cpu", help="cuda: also count what CUDA's sync debug mode reports"
    )
    args = parser.parse_args()
    rows = [("topk", True, "aux_k"), ("batchtopk", True, "aux_k")]
    rows += [
        (architecture, sparse, aux)
        for architecture in ("token_choice", "mutual_choice", "feature_choice")
        for sparse in (True, False)
        for aux in ("aux_k", "aux_zipf")
    ]
    print(f"B = {args.batch}, steps 3-5, {args.device}\n")
    print("| architecture | step | aux loss | syncs per step | operators (over 3 steps) |")
    print("|---|---|---|---|---|")
    for architecture, sparse, aux in rows:
        counts = count_syncs(architecture, sparse, aux, args.batch, device=args.device)
        ours = architecture in ("token_choice", "mutual_choice", "feature_choice")
        step = ("sparse" if sparse else "dense") if ours else "SAELens"
        detail = ", ".join(f"{name} {n}" for name, n in counts.most_common())
        print(
            f"| {architecture} | {step} | {aux if ours else '—'} | {sum(counts.values()) / 3:.1f} | {detail} |"
        )


if __name__ == "__main__":
    main()
