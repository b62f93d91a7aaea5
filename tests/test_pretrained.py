"""``compare`` and ``eval`` with SAEs loaded the way SAELens users load them: ``SAE.from_pretrained`` on a
Hugging Face repo id and on a release of SAELens's pretrained directory, read offline from a cache in the
hub's own layout (``models--org--name/snapshots/<rev>/<folder>``, ``refs/main``). Nothing is mocked: the
commands run in a subprocess with ``HF_HUB_CACHE`` pointed at the cache and ``HF_HUB_OFFLINE=1``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
TINY = ROOT / "tests" / "data" / "compare_tiny.yaml"
REVISION = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "org/tiny-saes"
# A release of SAELens's pretrained directory: its repo and the folder of each sae_id.
RELEASE, RELEASE_REPO = "gpt2-small-res-jb", "jbloom/GPT2-Small-SAEs-Reformatted"


def _sae_mc(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "sae_mutual_choice", *args], env=env, capture_output=True, text=True, cwd=ROOT
    )


def _publish(cache: Path, repo_id: str, folders: dict[str, Path]) -> None:
    """Put saved SAEs into the hub cache as the files of ``repo_id`` at ``REVISION``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    for folder, saved in folders.items():
        shutil.copytree(saved, repo / "snapshots" / REVISION / folder)


def _config(tmp_path: Path, name: str, evaluate_only: dict, saes: dict | None = None) -> Path:
    config = yaml.safe_load(TINY.read_text())
    config["saes"] = saes or {}
    config["evaluate_only"] = evaluate_only
    config["evaluation"]["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, Path]:
    """A TopK and a JumpReLU SAE trained on the tiny model's hook and one of ours exported, saved, and
    published in a hub cache under a repo id and under the directory release's folders."""
    tmp = tmp_path_factory.mktemp("pretrained")
    config = yaml.safe_load(TINY.read_text())
    config["saes"] = {
        "topk": config["saes"]["topk"],
        "topk8": {**config["saes"]["topk"], "k": 8},
        "jumprelu": {"architecture": "jumprelu", "d_in": 32, "d_sae": 128},
        "mutual_choice": config["saes"]["mutual_choice"],
    }
    config["evaluation"]["output_dir"] = str(tmp / "trained")
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    cache = tmp / "hub"
    assert _sae_mc(["compare", str(path)], cache).returncode == 0
    saes = tmp / "trained" / "saes"
    _publish(cache, REPO_ID, {name: saes / name for name in ("topk", "topk8", "jumprelu", "mutual_choice")})
    other_hook = tmp / "other_hook"
    shutil.copytree(saes / "topk", other_hook)
    cfg = json.loads((other_hook / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_pre"
    (other_hook / "cfg.json").write_text(json.dumps(cfg))
    _publish(
        cache, RELEASE_REPO, {"blocks.0.hook_resid_pre": saes / "topk", "blocks.1.hook_resid_pre": other_hook}
    )
    return cache, saes


def test_eval_loads_repo_ids_and_directory_releases_offline(published, tmp_path):
    cache, saes = published
    entries = {
        "hub_topk": {"release": REPO_ID, "sae_id": "topk"},
        "hub_jumprelu": {"release": REPO_ID, "sae_id": "jumprelu"},
        "hub_mutual_choice": {"release": REPO_ID, "sae_id": "mutual_choice"},
        "release_topk": {"release": RELEASE, "sae_id": "blocks.0.hook_resid_pre"},
        "release_other_hook": {"release": RELEASE, "sae_id": "blocks.1.hook_resid_pre"},
        "local_topk": {"path": str(saes / "topk")},
    }

    done = _sae_mc(["eval", str(_config(tmp_path, "eval", entries))], cache)

    assert done.returncode == 1, done.stderr  # one SAE failed
    assert "1 of 6 SAEs failed: ['release_other_hook']" in done.stderr
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    error = rows["release_other_hook"]["error"]
    assert "does not match the configured hook 'blocks.0.hook_resid_post'" in error
    assert f"{RELEASE}/blocks.1.hook_resid_pre" in error
    # The same SAE from the hub, from the release and from its directory: the same row.
    local = {key: value for key, value in rows["local_topk"].items() if key != "source"}
    for name in ("hub_topk", "release_topk"):
        assert {key: value for key, value in rows[name].items() if key != "source"} == local
    assert rows["hub_topk"]["source"] == f"{REPO_ID}/topk (from_pretrained)"
    assert rows["hub_jumprelu"]["architecture"] == "jumprelu"
    assert rows["hub_mutual_choice"]["architecture"] == "mutual_choice → jumprelu"
    assert rows["hub_mutual_choice"]["at_k_l0_mean"] == pytest.approx(4.0)
    table = (tmp_path / "eval" / "results.md").read_text()
    assert f"- hub_jumprelu: {REPO_ID}/jumprelu (from_pretrained)" in table


def test_compare_trains_beside_pretrained_saes_offline(published, tmp_path):
    cache, _ = published
    config = yaml.safe_load(TINY.read_text())
    path = _config(
        tmp_path,
        "compare",
        {"hub_topk": {"release": REPO_ID, "sae_id": "topk"}},
        saes={"feature_choice": config["saes"]["feature_choice"]},
    )

    done = _sae_mc(["compare", str(path)], cache)

    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "compare" / "results.json").read_text())
    assert set(rows) == {"feature_choice", "hub_topk"}
    assert rows["hub_topk"]["l0_mean"] == pytest.approx(4.0)
    assert rows["feature_choice"]["at_k_l0_mean"] == pytest.approx(4.0, rel=1e-3)  # per-latent rounding


def test_adaptive_saes_are_read_at_the_pretrained_saes_l0(published, tmp_path):
    cache, saes = published
    entries = {
        "pretrained_topk": {"release": REPO_ID, "sae_id": "topk8"},
        "ours": {"path": str(saes / "mutual_choice")},
    }

    assert _sae_mc(["eval", str(_config(tmp_path, "at_l0", entries))], cache).returncode == 0
    explicit = _config(tmp_path, "at_6", {"ours": {"path": str(saes / "mutual_choice")}})
    config = yaml.safe_load(explicit.read_text())
    config["evaluation"]["at_l0"] = 6
    explicit.write_text(yaml.safe_dump(config))
    assert _sae_mc(["eval", str(explicit)], cache).returncode == 0

    rows = json.loads((tmp_path / "at_l0" / "results.json").read_text())
    assert rows["ours"]["trained_k"] == 4.0
    assert rows["ours"]["at_k_l0_mean"] == pytest.approx(8.0)  # the pretrained TopK's k, not its own
    assert rows["pretrained_topk"]["at_k_l0_mean"] == pytest.approx(8.0)
    assert rows["ours"]["l0_mean"] < 6
    rows = json.loads((tmp_path / "at_6" / "results.json").read_text())
    assert rows["ours"]["at_k_l0_mean"] == pytest.approx(6.0)
