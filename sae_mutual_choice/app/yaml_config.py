"""YAML run configs: plain serialisations of SAELens's runner configs, read strictly.

SAELens's own ``from_dict`` silently drops keys it does not know; here an unknown key or a value
of the wrong type is a ``ValueError`` naming the key (``sae.k``, ``logger.log_to_wandb``, ...).
``--set key=value`` overrides are parsed as YAML scalars and applied before validation.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, get_sae_training_class

# Keys SAELens writes into serialised SAE configs that are not constructor fields.
SAE_DERIVED_KEYS = {"architecture", "metadata"}


def read_yaml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load a YAML mapping and apply ``key.sub=value`` overrides; unreadable input is a ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not a UTF-8 text file (a YAML config was expected): {error.reason}"
        ) from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {_yaml_problem(error)}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of config keys")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value (dotted keys for nested fields), got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} is not a mapping")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ValueError(f"--set {item}: the value is not valid YAML: {_yaml_problem(error)}") from error
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what the YAML parser found, and where (1-based line and column)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def check_fields(
    data: dict[str, Any], cls: type, prefix: str = "", allowed_extra: set[str] | None = None
) -> None:
    """Raise ``ValueError`` for keys ``cls`` (a dataclass) does not have, or values of the wrong type."""
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    for key, value in data.items():
        if key in (allowed_extra or set()):
            continue
        if key not in names:
            raise ValueError(
                f"unknown config key '{prefix}{key}' for {cls.__name__}; known keys: {sorted(names)}"
            )
        if not _matches(value, hints.get(key, Any)):
            raise ValueError(
                f"config key {prefix}{key} has the wrong type: expected {_describe(hints.get(key, Any))}, "
                f"got {type(value).__name__} {value!r}"
            )


def sae_config_from_dict(data: dict[str, Any], prefix: str = "sae.") -> Any:
    """A training SAE config from its dict (``architecture`` picks the registered class)."""
    architecture = data.get("architecture")
    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(
            f"{prefix}architecture must be a registered training architecture "
            f"{sorted(SAE_TRAINING_CLASS_REGISTRY)}, got {architecture!r}"
        )
    config_class = get_sae_training_class(architecture)[1]
    check_fields(data, config_class, prefix, SAE_DERIVED_KEYS)
    try:
        return config_class.from_dict(data)
    except ValueError as error:  # the config's own checks name the field; say which SAE it belongs to
        raise ValueError(f"{prefix}{error}") from error


def runner_config_from_dict(data: dict[str, Any]) -> LanguageModelSAERunnerConfig[Any]:
    """A ``LanguageModelSAERunnerConfig`` from a plain dict, strictly checked."""
    if not isinstance(data.get("sae"), dict):
        raise ValueError("config key 'sae' (a mapping with an 'architecture') is required")
    check_fields(data, LanguageModelSAERunnerConfig, "", {"sae", "logger"})
    check_fields(data.get("logger", {}), LoggingConfig, "logger.")
    sae_cfg = sae_config_from_dict(data["sae"])
    return LanguageModelSAERunnerConfig.from_dict(
        {**data, "sae": sae_cfg.to_dict(), "logger": data.get("logger", {})}
    )


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any or isinstance(annotation, typing.TypeVar):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(annotation))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
