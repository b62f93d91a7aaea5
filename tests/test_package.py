import importlib
import inspect
import pkgutil

import torch

import sae_mutual_choice
from sae_mutual_choice import allocation

RULES = {"token_choice", "mutual_choice", "feature_choice", "batch_budget"}


def test_every_public_name_is_what_it_says_after_every_submodule_is_imported():
    # A submodule named like a public function would replace it on the package once imported.
    for module in pkgutil.iter_modules(sae_mutual_choice.__path__):
        if module.name != "__main__":  # runs the command line
            importlib.import_module(f"sae_mutual_choice.{module.name}")
    for name in sae_mutual_choice.__all__:
        value = getattr(sae_mutual_choice, name)
        assert not inspect.ismodule(value), name
        if name in RULES:
            assert value is getattr(allocation, name), name
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
