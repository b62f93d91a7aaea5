"""``sae-mc upstream-patch``: the SAELens pull request, generated from the upstream layer."""

import shutil
import subprocess
from pathlib import Path

import pytest

from sae_mc import main
from sae_mutual_choice.app.upstream_patch import (
    PINNED_SAE_LENS,
    PR_MODULES,
    installed_sae_lens_root,
    rewrite_imports,
    sae_lens_version,
    upstream_patch,
)

UPSTREAM = Path(__file__).parents[1] / "sae_mutual_choice" / "upstream"
INITS = ("sae_lens/__init__.py", "sae_lens/saes/__init__.py")


def test_imports_are_rewritten_to_sae_lens_and_sorted_as_its_isort_sorts_them():
    source = (
        "import torch\n\n"
        "from sae_lens.saes.sae import SAEConfig\n"
        "from sae_mutual_choice.upstream.adaptive_allocation import (\n"
        "    batch_budget,\n"
        ")\n"
        "from sae_mutual_choice.upstream.mutual_choice_sae import mutual_choice\n\n"
        "X = 1\n"
    )

    rewritten = rewrite_imports(source)

    assert rewritten == (
        "import torch\n\n"
        "from sae_lens.saes.adaptive_allocation import (\n"
        "    batch_budget,\n"
        ")\n"
        "from sae_lens.saes.mutual_choice_sae import mutual_choice\n"
        "from sae_lens.saes.sae import SAEConfig\n\n"
        "X = 1\n"
    )


@pytest.fixture(scope="module")
def sae_lens_root() -> Path:
    root = installed_sae_lens_root()
    if sae_lens_version(root) != PINNED_SAE_LENS:
        pytest.skip(f"the installed SAELens is not the pinned {PINNED_SAE_LENS}")
    return root


def test_the_patch_applies_to_the_pinned_release_and_registers_both_architectures(sae_lens_root, tmp_path):
    for path in INITS:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sae_lens_root / path, tmp_path / path)
    assert main(["upstream-patch", str(tmp_path / "pr.patch")]) == 0
    patch = (tmp_path / "pr.patch").read_text()

    subprocess.run(["git", "apply", "pr.patch"], cwd=tmp_path, check=True)

    for module, target in PR_MODULES.items():
        assert (tmp_path / target).read_text() == rewrite_imports((UPSTREAM / f"{module}.py").read_text())
    init = (tmp_path / "sae_lens/__init__.py").read_text()
    assert 'register_sae_training_class(\n    "mutual_choice", MutualChoiceTrainingSAE,' in init
    assert '"feature_choice", FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig\n)' in init
    assert "from .feature_choice_sae import (" in (tmp_path / "sae_lens/saes/__init__.py").read_text()
    assert "sae_mutual_choice" not in patch
    assert sorted(path.name for path in (tmp_path / "tests" / "saes").iterdir()) == [
        "adaptive_allocation_helpers.py",
        "test_adaptive_allocation.py",
        "test_adaptive_allocation_contract.py",
        "test_feature_choice_sae.py",
        "test_mutual_choice_sae.py",
    ]


def test_a_patch_against_another_release_is_refused(sae_lens_root, tmp_path):
    (tmp_path / "sae_lens").mkdir()
    (tmp_path / "sae_lens" / "__init__.py").write_text('__version__ = "6.0.0"\n')

    with pytest.raises(ValueError, match=f"made against SAELens {PINNED_SAE_LENS}; .* holds 6.0.0"):
        upstream_patch(tmp_path)
