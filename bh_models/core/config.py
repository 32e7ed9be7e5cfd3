"""Load and validate config.yaml: every message names the key and the fix.

The JSON schema in ``workflow/schemas/config.schema.yaml`` is the single source
of truth for keys, types and defaults. Snakemake's ``validate`` is run on it as
well (the Snakefile calls :func:`check_config`), but jsonschema's raw messages
do not say how to fix a problem, so this module words them first.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from bh_models.core.errors import BHConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise BHConfigError(
                str(key),
                f"appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                "two datasets or settings with the same name would silently replace each other",
                "give each entry a unique name",
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML config, refusing duplicate keys."""
    path = Path(path)
    if not path.is_file():
        raise BHConfigError(str(path), "config file not found", "pass an existing file with --configfile")
    with open(path, encoding="utf-8") as fh:
        data = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    return data or {}


def load_schema(path: str | os.PathLike = SCHEMA_PATH) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _key(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _friendly(error: jsonschema.ValidationError) -> BHConfigError:
    key = _key(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted((error.schema.get("properties") or {}).keys())
        extra = sorted(set(error.instance) - set(allowed))
        bad = ".".join(filter(None, [key if key != "(top level)" else "", extra[0] if extra else ""]))
        return BHConfigError(bad, "unknown config key", f"remove it or use one of: {', '.join(allowed)}")
    if error.validator == "required":
        return BHConfigError(key, error.message, "add the missing key (see workflow/schemas/config.schema.yaml)")
    if error.validator == "propertyNames":
        return BHConfigError(f"{key}.{error.instance}", "name has characters that are not allowed",
                             "use letters, digits, '-' or '_' only")
    description = error.schema.get("description", "")
    return BHConfigError(key, f"{error.message}", f"set a valid value. {description}".strip())


def apply_defaults(config: Any, schema: Mapping) -> Any:
    """Fill schema defaults in place, including inside ``additionalProperties`` entries."""
    if not isinstance(config, dict) or schema.get("type") not in ("object", None):
        return config
    for name, sub in (schema.get("properties") or {}).items():
        if name not in config and "default" in sub:
            config[name] = copy.deepcopy(sub["default"])
        if name in config:
            apply_defaults(config[name], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        known = set(schema.get("properties") or {})
        for name, value in config.items():
            if name not in known:
                apply_defaults(value, extra)
    return config


def check_config(config: dict, *, schema_path: str | os.PathLike = SCHEMA_PATH, base_dir: str | os.PathLike = ".") -> dict:
    """Validate ``config`` and fill defaults. Returns the same dict.

    Raises
    ------
    BHConfigError
        Naming the first offending key and the fix.
    """
    schema = load_schema(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key(e.absolute_path)))
    if errors:
        raise _friendly(errors[0])
    apply_defaults(config, schema)
    _check_semantics(config, Path(base_dir))
    return config


PRETRAIN_ROLES = ("pretrain", "both")
DOWNSTREAM_ROLES = ("downstream", "both")


def pretraining_datasets(config: Mapping) -> list[str]:
    """Datasets that feed the store and the pretraining jobs, in config order."""
    return [name for name, entry in config["datasets"].items() if entry.get("role", "pretrain") in PRETRAIN_ROLES]


def downstream_datasets(config: Mapping) -> list[str]:
    """Datasets that are encoded by the frozen models and evaluated, in config order."""
    return [name for name, entry in config["datasets"].items() if entry.get("role", "pretrain") in DOWNSTREAM_ROLES]


def _check_roles(config: dict) -> None:
    """Dataset roles against targets and model.bundle (see the schema's ``role``)."""
    bundle = config["model"]["bundle"]
    for name, entry in config["datasets"].items():
        key = f"datasets.{name}"
        if entry["role"] in DOWNSTREAM_ROLES and not entry.get("targets"):
            raise BHConfigError(f"{key}.targets", f"a dataset with role {entry['role']} needs at least one target",
                                "add e.g. `diagnosis: {column: diagnosis, type: classification, positive: patient}`, "
                                "or set role: pretrain")
        if entry["role"] == "pretrain" and entry.get("targets"):
            raise BHConfigError(f"{key}.targets", "targets of a role pretrain dataset would never be evaluated",
                                "set role: both to also evaluate this dataset on its own subjects, or remove targets")
        if bundle and entry["role"] in PRETRAIN_ROLES:
            raise BHConfigError(f"{key}.role", f"is {entry['role']}, but model.bundle is set, so nothing is "
                                "pretrained", "set role: downstream, or remove model.bundle to pretrain")
    if not bundle and not pretraining_datasets(config):
        raise BHConfigError("model.bundle", "is not set and no dataset has role pretrain or both: nothing would "
                            "train the models", "give a pretraining dataset, or set model.bundle to an existing "
                            "bundle (e.g. results/models of an earlier run)")


PLACEHOLDER = "PLACEHOLDER"  # marks the made-up paths of documented example configs


def _check_placeholders(config: dict) -> None:
    """Placeholder paths belong only in configs marked ``example_only``."""
    if config["example_only"]:
        return
    paths = {"results_dir": config["results_dir"], "model.bundle": config["model"]["bundle"] or "",
             **{f"datasets.{name}.bids_root": entry["bids_root"] for name, entry in config["datasets"].items()}}
    for key, value in paths.items():
        if PLACEHOLDER in str(value):
            raise BHConfigError(key, f"{value!r} is a placeholder of an example config",
                                "set the real path (copied from workflow/examples? set every bids_root)")


def _check_semantics(config: dict, base_dir: Path) -> None:
    _check_roles(config)
    _check_placeholders(config)
    roots: dict[Path, str] = {}
    results = (base_dir / config["results_dir"]).resolve()
    for name, entry in config["datasets"].items():
        if name == "pooled" and config["evaluate"].get("pooled", True):
            raise BHConfigError("datasets.pooled", "'pooled' names the all-datasets evaluation",
                                "rename the dataset, or set evaluate.pooled: false")
        root = (base_dir / entry["bids_root"]).resolve()
        if root in roots:
            raise BHConfigError(
                f"datasets.{name}.bids_root",
                f"same BIDS root as dataset '{roots[root]}'",
                "list each dataset once; use filters to select parts of one dataset",
            )
        roots[root] = name
        if results == root or root in results.parents:
            raise BHConfigError("results_dir", f"is inside the BIDS root of '{name}'; raw data must never be written",
                                "choose a results_dir outside every BIDS root")
        for task, spec in entry.get("targets", {}).items():
            if spec["type"] == "classification" and "positive" not in spec:
                raise BHConfigError(f"datasets.{name}.targets.{task}.positive", "missing for a classification task",
                                    "name the positive class, e.g. positive: patient")


def config_hash(config: Mapping) -> str:
    """sha256 of the canonical JSON form of the config."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_config(path: str | os.PathLike, *, base_dir: str | os.PathLike | None = None) -> dict:
    """Read, validate and default-fill a config file."""
    path = Path(path)
    return check_config(load_yaml(path), base_dir=base_dir if base_dir is not None else Path.cwd())
