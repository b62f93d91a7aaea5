import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

import sae_mutual_choice
from sae_mutual_choice.fast import token_choice_sae
from sae_mutual_choice.upstream import adaptive_allocation, feature_choice_sae, mutual_choice_sae

PACKAGE = Path(sae_mutual_choice.__file__).parent
RULES = {
    "token_choice": token_choice_sae,
    "mutual_choice": mutual_choice_sae,
    "feature_choice": feature_choice_sae,
    "batch_budget": adaptive_allocation,
}
# Each layer imports only the layers below it (upstream: torch, SAELens and itself).
LAYERS = {"upstream": set(), "fast": {"upstream"}, "app": {"upstream", "fast"}}


def _modules() -> list[str]:
    found = pkgutil.walk_packages(sae_mutual_choice.__path__, prefix="sae_mutual_choice.")
    return [module.name for module in found if not module.name.endswith("__main__")]  # runs the CLI


def test_every_public_name_is_what_it_says_after_every_submodule_is_imported():
    # A submodule named like a public function would replace it on the package once imported.
    for name in _modules():
        importlib.import_module(name)
    for name in sae_mutual_choice.__all__:
        value = getattr(sae_mutual_choice, name)
        assert not inspect.ismodule(value), name
        if name in RULES:
            assert value is getattr(RULES[name], name), name
        elif name[0].isupper() and name != "ARCHITECTURES":
            assert inspect.isclass(value), name
        elif name != "ARCHITECTURES":
            assert inspect.isfunction(value), name


def test_the_rules_are_callable_from_the_package():
    from sae_mutual_choice import feature_choice, mutual_choice, token_choice

    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, -1.0]])
    assert torch.equal(
        token_choice(scores, 1) != 0, torch.tensor([[True, False, False], [False, True, False]])
    )
    assert int((mutual_choice(scores, 2) != 0).sum()) == 2
    capacities = torch.tensor([1, 1, 0])
    assert torch.equal(
        feature_choice(scores, capacities) != 0, torch.tensor([[True, False, False], [False, True, False]])
    )


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", list(LAYERS))
def test_each_layer_imports_only_the_layers_below_it(layer):
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files
    for path in files:
        for name in _imported_packages(path):
            if name == "sae_mutual_choice" or name.startswith("sae_mutual_choice."):
                below = name.split(".")[1] if "." in name else "sae_mutual_choice"
                assert below in LAYERS[layer] | {layer}, f"{path.name} imports {name}"
