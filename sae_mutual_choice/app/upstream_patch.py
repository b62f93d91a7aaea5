"""The SAELens pull request, generated from this package: ``sae-mc upstream-patch FILE``.

The PR's modules are this package's :mod:`sae_mutual_choice.upstream` modules with their imports
rewritten to ``sae_lens.saes``; its tests are this checkout's ``tests/saes/`` files written for
it (:data:`PR_TESTS`) and its docs page ``docs/sae_lens/adaptive_allocation.md``. The patch also
adds the imports, ``__all__`` entries and registrations to ``sae_lens/__init__.py`` and
``sae_lens/saes/__init__.py``, and applies with ``git apply`` at the root of the unpacked wheel
of SAELens :data:`PINNED_SAE_LENS` (paths ``sae_lens/...``, ``tests/saes/...``, ``docs/...``).
"""

import ast
import difflib
import importlib.util
import re
from pathlib import Path

PINNED_SAE_LENS = "6.54.12"
PACKAGE = Path(__file__).resolve().parents[1]
CHECKOUT = PACKAGE.parent
# This package's module -> the PR's file.
PR_MODULES = {
    "adaptive_allocation": "sae_lens/saes/adaptive_allocation.py",
    "mutual_choice_sae": "sae_lens/saes/mutual_choice_sae.py",
    "feature_choice_sae": "sae_lens/saes/feature_choice_sae.py",
}
PR_TESTS = (
    "tests/saes/adaptive_allocation_helpers.py",
    "tests/saes/test_adaptive_allocation.py",
    "tests/saes/test_mutual_choice_sae.py",
    "tests/saes/test_feature_choice_sae.py",
    "tests/saes/test_adaptive_allocation_contract.py",
)
PR_DOCS = {"docs/sae_lens/adaptive_allocation.md": "docs/adaptive_allocation.md"}
# The PR's exported names, by module, and their registry names.
EXPORTS = {
    "feature_choice_sae": ("FeatureChoiceTrainingSAE", "FeatureChoiceTrainingSAEConfig"),
    "mutual_choice_sae": ("MutualChoiceTrainingSAE", "MutualChoiceTrainingSAEConfig"),
}
REGISTERED = {"mutual_choice": "mutual_choice_sae", "feature_choice": "feature_choice_sae"}
IMPORT = re.compile(r"\bsae_mutual_choice\.upstream\.(\w+)")


def rewrite_imports(source: str) -> str:
    """``source`` with this package's upstream imports turned into SAELens's, and its first-party
    imports (``sae_lens``) re-sorted by module as SAELens's isort settings sort them."""
    source = IMPORT.sub(lambda match: f"sae_lens.saes.{match.group(1)}", source)
    lines = source.splitlines(keepends=True)
    imports = [
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sae_lens")
    ]
    if not imports:
        return source
    first, last = imports[0].lineno - 1, imports[-1].end_lineno or imports[-1].lineno
    block = lines[first:last]
    if len(block) != sum((node.end_lineno or node.lineno) - node.lineno + 1 for node in imports):
        raise ValueError("the sae_lens imports of an upstream module must be one contiguous block")
    pieces = [
        "".join(lines[node.lineno - 1 : node.end_lineno or node.lineno])
        for node in sorted(imports, key=lambda node: node.module or "")
    ]
    return "".join(lines[:first] + pieces + lines[last:])


def installed_sae_lens_root() -> Path:
    """The directory holding the installed ``sae_lens`` package (its wheel's root)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or spec.origin is None:
        raise ValueError("SAELens is not installed")
    return Path(spec.origin).parent.parent


def sae_lens_version(root: Path) -> str:
    """The ``__version__`` of the ``sae_lens`` package under ``root``."""
    found = re.search(r'__version__ = "([^"]+)"', (root / "sae_lens" / "__init__.py").read_text())
    if found is None:
        raise ValueError(f"no __version__ in {root / 'sae_lens' / '__init__.py'}")
    return found.group(1)


def insert_at(text: str, anchor: str, addition: str, path: str, before: bool = False) -> str:
    """``text`` with ``addition`` inserted after (``before``: before) the first line equal to ``anchor``."""
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.rstrip("\n") == anchor:
            at = index if before else index + 1
            return "".join(lines[:at]) + addition + "".join(lines[at:])
    raise ValueError(f"{path}: no line {anchor!r} to insert at (not SAELens {PINNED_SAE_LENS}?)")


def registered_init(text: str) -> str:
    """``sae_lens/__init__.py`` with the PR's classes imported, exported and registered."""
    path = "sae_lens/__init__.py"
    fc, fc_cfg = EXPORTS["feature_choice_sae"]
    mc, mc_cfg = EXPORTS["mutual_choice_sae"]
    text = insert_at(text, "    BatchTopKTrainingSAEConfig,", f"    {fc},\n    {fc_cfg},\n", path)
    text = insert_at(text, "    MatryoshkaBatchTopKTrainingSAEConfig,", f"    {mc},\n    {mc_cfg},\n", path)
    names = "".join(f'    "{name}",\n' for name in (mc, mc_cfg, fc, fc_cfg))
    text = insert_at(text, '    "MatryoshkaBatchTopKTrainingSAEConfig",', names, path)
    registrations = "".join(
        f'register_sae_training_class(\n    "{name}", {EXPORTS[module][0]}, {EXPORTS[module][1]}\n)\n'
        for name, module in REGISTERED.items()
    )
    anchor = 'register_sae_class("transcoder", Transcoder, TranscoderConfig)'
    return insert_at(text, anchor, registrations, path, before=True)


def registered_saes_init(text: str) -> str:
    """``sae_lens/saes/__init__.py`` with the PR's classes imported and exported."""
    path = "sae_lens/saes/__init__.py"
    anchors = {
        "feature_choice_sae": "from .gated_sae import (",
        "mutual_choice_sae": "from .sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig",
    }
    for module, anchor in anchors.items():
        names = "".join(f"    {name},\n" for name in EXPORTS[module])
        text = insert_at(text, anchor, f"from .{module} import (\n{names})\n", path, before=True)
    names = "".join(
        f'    "{name}",\n'
        for module in ("mutual_choice_sae", "feature_choice_sae")
        for name in EXPORTS[module]
    )
    return insert_at(text, '    "MatryoshkaBatchTopKTrainingSAEConfig",', names, path)


def file_diff(path: str, old: str | None, new: str) -> str:
    """A git-style diff turning ``old`` (None: no file) into ``new`` at ``path``."""
    header = f"diff --git a/{path} b/{path}\n"
    if old is None:
        header += "new file mode 100644\n"
    body = difflib.unified_diff(
        [] if old is None else old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        "/dev/null" if old is None else f"a/{path}",
        f"b/{path}",
    )
    return header + "".join(body)


def pr_files(checkout: Path = CHECKOUT) -> dict[str, str]:
    """The PR's new files: path in SAELens -> content."""
    files = {
        target: rewrite_imports((PACKAGE / "upstream" / f"{module}.py").read_text())
        for module, target in PR_MODULES.items()
    }
    for source, target in {**{test: test for test in PR_TESTS}, **PR_DOCS}.items():
        path = checkout / source
        if not path.is_file():
            raise ValueError(
                f"{path} not found: upstream-patch takes the PR's tests and docs from a source "
                "checkout of sae-mutual-choice (pip install -e .)"
            )
        files[target] = rewrite_imports(path.read_text()) if source.endswith(".py") else path.read_text()
    return files


def upstream_patch(sae_lens_root: Path | None = None) -> str:
    """The PR as one patch against the SAELens wheel unpacked at ``sae_lens_root`` (default: the
    installed SAELens, which must be :data:`PINNED_SAE_LENS`)."""
    root = sae_lens_root or installed_sae_lens_root()
    version = sae_lens_version(root)
    if version != PINNED_SAE_LENS:
        raise ValueError(
            f"the patch is made against SAELens {PINNED_SAE_LENS}; {root} holds {version}. Unpack the "
            f"pinned wheel (pip download sae-lens=={PINNED_SAE_LENS} --no-deps) and pass its directory"
        )
    diffs = [file_diff(path, None, content) for path, content in pr_files().items()]
    for path, edit in (
        ("sae_lens/__init__.py", registered_init),
        ("sae_lens/saes/__init__.py", registered_saes_init),
    ):
        old = (root / path).read_text()
        diffs.append(file_diff(path, old, edit(old)))
    return "".join(diffs)
