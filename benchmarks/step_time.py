"""Training-step time and peak memory of each architecture, relative to SAELens's ``topk``.

For B tokens and each (d_in, F, k): one step is ``training_forward_pass`` + backward + Adam, as SAELens's
trainer does. Architectures are timed interleaved, repetition by repetition, after warm-up; the printed
ratio is the median over repetitions of (step time / SAELens ``topk`` step time in the same repetition).
"encoder" is the one unavoidable matmul, ``sae_in @ W_enc`` (2·B·d·F FLOPs), timed the same way. Our
architectures take the sparse step with ``aux_loss="aux_zipf"`` (the costlier aux loss:
it selects among every under-used latent, AuxK among the dead ones only); the "no aux" rows switch it
off to show what the aux loss's own pairs cost (d_in // 2 per token, as in AuxK); on CUDA the "dense"
rows time their dense step (``sparse_training=False``), the evidence ``sparse_training="auto"`` needs. Peak
memory is measured per architecture in a fresh subprocess (peak RSS after two steps minus RSS before
building the SAE, from ``/proc/self/status``), relative to ``topk``.

    python benchmarks/step_time.py [--quick] [--reps 5]
    python benchmarks/step_time.py --device cuda [--autocast] [--out FILE.json]
    python benchmarks/step_time.py --render docs/results/step_time.json   # docs/results.md from the JSON

The full CPU run writes docs/results/step_time.json and its table into docs/results.md (section
"overhead"). ``--device cuda`` times with CUDA events (the device's time, every repetition
synchronised once at its end) at (d_in, F, k) = (768, 24576, 32) and (2304, 65536, 64), and measures
peak memory in process with ``max_memory_allocated``; ``--autocast`` runs the steps under bf16
autocast, as SAELens's ``autocast: true`` does (on CPU too). Non-default runs write ``--out`` only.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import write_section
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput

import sae_mutual_choice  # noqa: F401  (registers the architectures)

RESULTS_JSON = Path(__file__).parent.parent / "docs" / "results" / "step_time.json"

OURS = ["token_choice", "mutual_choice", "feature_choice"]
ARCHITECTURES = ["topk", "batchtopk", *OURS, *(f"{name} no aux" for name in OURS)]
# Our dense steps (sparse_training=False), timed on CUDA, where sparse_training="auto" needs them.
DENSE = [f"{name} dense" for name in OURS]


def build(variant: str, d_in: int, d_sae: int, k: int) -> Any:
    """The training SAE of a row: an architecture name, optionally followed by " no aux" or " dense"."""
    architecture = variant.removesuffix(" no aux").removesuffix(" dense")
    sae_class, config_class = get_sae_training_class(architecture)
    kwargs: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k if architecture in ("topk", "token_choice") else float(k),
    }
    if architecture in ("mutual_choice", "feature_choice"):
        kwargs["threshold_calibration_tokens"] = 0  # steady-state step; the kept inputs cost nothing per step
    if architecture in OURS:
        kwargs["aux_loss"] = "none" if variant.endswith(" no aux") else "aux_zipf"
        kwargs["sparse_training"] = not variant.endswith(" dense")
    return sae_class(config_class(**kwargs))


def step(
    sae: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor, autocast: bool = False
) -> None:
    coefficients = {"aux_loss": 1.0} if sae.get_coefficients() else {}
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead, 0, False))
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Clock:
    """Elapsed time of a piece of work: wall time on CPU, CUDA events (device time) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started: Any) -> Any:
        if not self.cuda:
            return time.perf_counter() - started
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return started, event

    @staticmethod
    def seconds(measured: Any) -> float:
        if isinstance(measured, float):
            return measured
        started, stopped = measured
        return started.elapsed_time(stopped) / 1e3


def time_steps(
    batch: int,
    d_in: int,
    d_sae: int,
    k: int,
    reps: int,
    device: torch.device,
    autocast: bool = False,
    variants: list[str] = ARCHITECTURES,
) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(batch, d_in, device=device)
    dead = torch.rand(d_sae, device=device) < 0.05  # a few dead latents, so the aux losses do their work
    saes = {name: build(name, d_in, d_sae, k).to(device) for name in variants}
    optimizers = {name: torch.optim.Adam(sae.parameters(), lr=1e-4) for name, sae in saes.items()}
    W_enc = saes["topk"].W_enc.detach()
    clock = Clock(device)
    measured: dict[str, list[Any]] = {name: [] for name in [*variants, "encoder"]}
    for rep in range(reps + 1):  # repetition 0 is the warm-up
        for name in [*variants, "encoder"]:
            started = clock.start()
            if name == "encoder":
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    _ = x @ W_enc
            else:
                step(saes[name], optimizers[name], x, dead, autocast)
            if rep:
                measured[name].append(clock.stop(started))
        if clock.cuda:
            torch.cuda.synchronize()
    times = {name: [clock.seconds(m) for m in ms] for name, ms in measured.items()}
    result = {f"{name}_seconds": statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        for base in ("topk", "batchtopk", "encoder"):
            result[f"{name}_over_{base}"] = statistics.median(
                a / b for a, b in zip(t, times[base], strict=True)
            )
    return result


def cuda_peak_memory(architecture: str, batch: int, d_in: int, d_sae: int, k: int, autocast: bool) -> int:
    """Bytes: peak CUDA memory of two steps above what was allocated before the SAE was built."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    x = torch.randn(batch, d_in, device="cuda")
    dead = torch.rand(d_sae, device="cuda") < 0.05
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sae = build(architecture, d_in, d_sae, k).cuda()
    optimizer = torch.optim.Adam(sae.parameters())
    for _ in range(2):
        step(sae, optimizer, x, dead, autocast)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def memory_kb(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` (Linux): ``VmRSS`` now, ``VmHWM`` peak.

    Not ``ru_maxrss``: it survives fork and exec, so a child would start at its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(architecture: str, batch: int, d_in: int, d_sae: int, k: int) -> int:
    """Bytes: peak RSS of two steps minus the RSS before the SAE was built, in a fresh process."""
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks'); import step_time as s;"
        f"x = torch.randn({batch}, {d_in}); dead = torch.rand({d_sae}) < 0.05;"
        "before = s.memory_kb('VmRSS');"
        f"sae = s.build({architecture!r}, {d_in}, {d_sae}, {k}); opt = torch.optim.Adam(sae.parameters());"
        "[s.step(sae, opt, x, dead) for _ in range(2)];"
        "print(s.memory_kb('VmHWM') - before)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast, as SAELens's autocast: true")
    parser.add_argument("--out", type=Path, default=None, help="JSON output of a non-default run")
    parser.add_argument(
        "--render", type=Path, default=None, help="only rewrite docs/results.md from this JSON"
    )
    args = parser.parse_args()
    if args.render:
        done = json.loads(args.render.read_text())
        write_section("overhead", section(done["rows"], done["wall_seconds"]))
        return
    device = torch.device(args.device)
    started = time.perf_counter()
    if args.quick:
        batch, sizes = 256, [(64, 512, 8)]
    elif device.type == "cuda":
        batch, sizes = 4096, [(768, 24576, 32), (2304, 65536, 64)]
    else:
        batch, sizes = 4096, [(768, 16384, 32), (576, 4608, 32)]
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"torch {torch.__version__}, {where}, B = {batch}, {args.reps} repetitions"
        + (", bf16 autocast" if args.autocast else "")
    )
    variants = ARCHITECTURES + (DENSE if device.type == "cuda" else [])
    rows = []
    for d_in, d_sae, k in sizes:
        timing = time_steps(batch, d_in, d_sae, k, args.reps, device, args.autocast, variants)
        memory = {
            name: cuda_peak_memory(name, batch, d_in, d_sae, k, args.autocast)
            if device.type == "cuda"
            else peak_memory(name, batch, d_in, d_sae, k)
            for name in variants
        }
        for name in variants:
            rows.append(
                {
                    "d_in": d_in,
                    "d_sae": d_sae,
                    "k": k,
                    "architecture": name,
                    "step_seconds": timing[f"{name}_seconds"],
                    "over_topk": timing[f"{name}_over_topk"],
                    "over_batchtopk": timing[f"{name}_over_batchtopk"],
                    "over_encoder": timing[f"{name}_over_encoder"],
                    "peak_memory_mb": memory[name] / 2**20,
                    "memory_over_topk": memory[name] / max(memory["topk"], 1),
                }
            )
        print(f"encoder matmul alone: {timing['encoder_seconds']:.4f} s")
    print("\n" + table(rows))
    print(json.dumps(rows))
    wall = time.perf_counter() - started
    payload = {"rows": rows, "wall_seconds": wall, "torch": torch.__version__, "device": where}
    payload["autocast"] = args.autocast
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
    elif not args.quick and device.type == "cpu" and not args.autocast:
        RESULTS_JSON.write_text(json.dumps(payload, indent=1))
        write_section("overhead", section(rows, wall))


def table(rows: list[dict[str, Any]]) -> str:
    batchtopk = all("over_batchtopk" in r for r in rows)  # runs before it have no such column
    places = 3 if min(r["step_seconds"] for r in rows) >= 0.01 else 5  # GPU steps take milliseconds
    lines = [
        "| d_in, F, k | architecture | step s | / topk step |"
        + (" / batchtopk step |" if batchtopk else "")
        + " / encoder matmul | peak MB | / topk memory |",
        "|---|---|---|---|---|---|---|" + ("---|" if batchtopk else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['d_in']}, {r['d_sae']}, {r['k']} | {r['architecture']} | {r['step_seconds']:.{places}f} | {r['over_topk']:.2f}"
            + (f" | {r['over_batchtopk']:.2f}" if batchtopk else "")
            + f" | {r['over_encoder']:.2f} | {r['peak_memory_mb']:.0f} | {r['memory_over_topk']:.2f} |"
        )
    return "\n".join(lines)


def section(rows: list[dict[str, Any]], wall: float) -> str:
    """The generated part of docs/results.md for this benchmark."""
    return (
        "Training step (forward, backward, Adam) at B = 4096, interleaved repetitions, median of per-repetition "
        'ratios to SAELens `topk`\'s dense step; ours with aux_zipf, or none ("no aux"); peak memory per '
        "architecture in a fresh process. "
        f"`python benchmarks/step_time.py`: {wall / 60:.0f} min on 2 CPU cores, torch {torch.__version__} "
        "(analysis: docs/performance.md).\n\n" + table(rows)
    )


if __name__ == "__main__":
    main()
