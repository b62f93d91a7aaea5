"""Training steps of this checkout against another revision's, interleaved step by step.

A change to the step is judged by timing old and new side by side, since the machine's speed drifts
by more than most changes. Two worker processes, one running this checkout's package and
``benchmarks/step_time.py``, one a revision's (exported with ``git archive`` to a temporary
directory), train the same SAE (the same initial weights, sent by this process) on the same inputs,
and take turns, one step each, the order alternating; a step is ``step_time.step`` (forward,
backward, Adam; ``aux_loss="aux_zipf"``, a few dead latents as in step_time.py). Prints, per
architecture, each side's median step time over the steps after the second and the median of the
per-step ratios (this checkout / the revision).

    python benchmarks/ab_steps.py --base REV [--architectures A ...] [--steps 12]
        [--shape B D_IN F K | --demo [--sae PATH]]

``--demo``: the demo's activations (its config's model and hook, as benchmarks/mc_shortlist.py
reads them; B 2,048) and width, from ``--sae``'s weights (e.g. results/demo/saes/mutual_choice:
a trained SAE on raw activations, which its weights expect) or new ones (on the activations scaled
to mean norm sqrt(d_in), as the demo's ``normalize_activations`` does). Otherwise Gaussian inputs of
``--shape`` (default B 4,096, d_in 576, F 4,608, k 32) and new weights.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import torch

ROOT = Path(__file__).parent.parent


def worker(architecture: str, d_in: int, d_sae: int, k: int, data: str) -> None:
    """Serve steps on stdin: one line per step, answered with its seconds (run with --worker)."""
    import time

    del sys.path[0]  # this script's folder: step_time comes from the revision's (PYTHONPATH)
    import step_time
    from step_time import build, step

    import sae_mutual_choice

    saved = torch.load(data)
    torch.manual_seed(0)
    sae = build(architecture, d_in, d_sae, k)
    sae.load_state_dict({**sae.state_dict(), **saved["state"]})
    optimizer = torch.optim.Adam(sae.parameters(), lr=4e-4)
    print(json.dumps({"files": [sae_mutual_choice.__file__, step_time.__file__]}), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        step(sae, optimizer, saved["x"], saved["dead"])
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def start_worker(root: Path, arguments: list[str]) -> subprocess.Popen[str]:
    """A worker whose package and step_time.py come from ``root``."""
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'benchmarks'}"}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *arguments],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root,
    )  # fmt: skip


def answer(process: subprocess.Popen[str]) -> dict[str, Any]:
    stdout: IO[str] | None = process.stdout
    assert stdout is not None
    line = stdout.readline()
    if not line:
        raise RuntimeError(f"a worker stopped (exit {process.wait()})")
    return json.loads(line)


def timed_pair(roots: dict[str, Path], arguments: list[str], steps: int) -> dict[str, list[float]]:
    """Seconds of each side's steps, taken in turns."""
    workers = {side: start_worker(root, arguments) for side, root in roots.items()}
    try:
        for side, process in workers.items():
            for file in answer(process)["files"]:
                if not Path(file).resolve().is_relative_to(roots[side].resolve()):
                    raise RuntimeError(f"the {side} worker imported {file}, not {roots[side]}'s")
        seconds: dict[str, list[float]] = {side: [] for side in workers}
        sides = list(workers)
        for index in range(steps):
            for side in sides if index % 2 == 0 else sides[::-1]:
                stdin = workers[side].stdin
                assert stdin is not None
                stdin.write("step\n")
                stdin.flush()
                seconds[side].append(answer(workers[side])["seconds"])
        return seconds
    finally:
        for process in workers.values():
            process.kill()
            process.wait()


def demo_inputs(sae_path: Path | None) -> tuple[torch.Tensor, int, dict[str, torch.Tensor] | None]:
    """The demo's activations (2,048 tokens; mc_shortlist.step_start's), its width, and ``sae_path``'s
    weights (or None)."""
    from mc_shortlist import config_activations, step_start

    from sae_mutual_choice.app.cli import demo_config

    x, d_sae, _ = config_activations(demo_config(), 2048)
    x, state = step_start(x, sae_path)
    return x, d_sae, state


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base", help="the git revision to compare with")
    parser.add_argument(
        "--architectures", nargs="+", default=["token_choice", "mutual_choice", "feature_choice"]
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--shape", type=int, nargs=4, default=[4096, 576, 4608, 32], metavar=("B", "D_IN", "F", "K")
    )
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--sae", type=Path, default=None)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        architecture, d_in, d_sae, k, data = args.worker
        worker(architecture, int(d_in), int(d_sae), int(k), data)
        return
    if not args.base:
        parser.error("--base REV is required")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mc_shortlist import WEIGHTS
    from step_time import build

    k = args.shape[3]
    if args.demo:
        x, d_sae, state = demo_inputs(args.sae)
    else:
        n_tokens, d_in, d_sae, k = args.shape
        x, state = torch.randn(n_tokens, d_in, generator=torch.Generator().manual_seed(0)), None
    dead = torch.rand(d_sae, generator=torch.Generator().manual_seed(1)) < 0.05
    print(f"B {x.shape[0]}, d_in {x.shape[1]}, F {d_sae}, k {k}; {'demo activations' if args.demo else 'Gaussian'}; "
          f"this checkout against {args.base}, {args.steps} steps each, interleaved")  # fmt: skip
    print("| architecture | this checkout ms | base ms | this / base |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        base_root = Path(tmp) / "base"
        base_root.mkdir()
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base_root)], input=archive.stdout, check=True)
        for architecture in args.architectures:
            data = Path(tmp) / f"{architecture}.pt"
            torch.manual_seed(0)
            initial = state or {
                name: tensor
                for name, tensor in build(architecture, x.shape[1], d_sae, k).state_dict().items()
                if name in WEIGHTS
            }
            torch.save({"x": x, "dead": dead, "state": initial}, data)
            arguments = [architecture, str(x.shape[1]), str(d_sae), str(k), str(data)]
            seconds = timed_pair({"this": ROOT, "base": base_root}, arguments, args.steps)
            this, base = seconds["this"][2:], seconds["base"][2:]
            ratio = statistics.median(a / b for a, b in zip(this, base, strict=True))
            print(f"| {architecture} | {1e3 * statistics.median(this):.1f} | {1e3 * statistics.median(base):.1f} "
                  f"| {ratio:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
