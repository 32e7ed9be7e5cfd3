"""Methods sentences: filling the ``{name}`` placeholders of a module's ``__desc__`` from the config.

Every processing module states what it did in a ``__desc__`` sentence
(NiPreps style), possibly with ``{name}`` or ``{name:spec}`` placeholders. The
modules fill them in their sidecars and ``describe_methods`` hooks, and the
records stage assembles them into the methods boilerplate; this is the one
lookup they share.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

_PLACEHOLDER = re.compile(r"\{(?P<name>[A-Za-z_][\w-]*(?:\.[\w-]+)*)(?::(?P<spec>[^{}]*))?\}")


def flatten_config(*, config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"dotted.key": value}``; lists stay values.

    Parameters
    ----------
    config : mapping
        Workflow config.
    prefix : str
        Prefix of the keys (used in recursion).

    Returns
    -------
    dict
        Leaf values by dotted key, in sorted key order.
    """
    flat: dict[str, Any] = {}
    for key in sorted(config, key=str):
        value = config[key]
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(config=value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def format_value(value: Any, spec: str = "") -> str:
    if spec:
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            pass
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


_MISSING = object()


def _unique(values: list[Any]) -> Any:
    distinct = []
    for value in values:
        if value not in distinct:
            distinct.append(value)
    return distinct[0] if len(distinct) == 1 else _MISSING


def _default_in_module(module: ModuleType, name: str) -> Any:
    # The default of a same-named keyword of the module's public functions,
    # when they agree: what a run uses unless the rule overrides it.
    defaults = []
    for attr, func in vars(module).items():
        if attr.startswith("_") or not inspect.isfunction(func) or func.__module__ != module.__name__:
            continue
        param = inspect.signature(func).parameters.get(name)
        if param is not None and param.default not in (inspect.Parameter.empty, None):
            defaults.append(param.default)
    return _unique(defaults)


def placeholder_value(*, name: str, config: Mapping[str, Any], module: ModuleType | None = None) -> Any:
    """Value for a ``{name}`` placeholder of a ``__desc__``.

    Looked up, in order: the dotted config key ``name``; the config leaves
    whose last key is ``name``, if they all agree; a module constant
    ``NAME``; the default of a keyword ``name`` of the module's public
    functions, if they agree.

    Returns
    -------
    Any
        The value, or :data:`None` when nothing names it.
    """
    flat = flatten_config(config=config)
    if name in flat:
        return flat[name]
    value = _unique([v for k, v in flat.items() if k.rsplit(".", 1)[-1] == name])
    if value is _MISSING and module is not None:
        value = getattr(module, name.upper(), _MISSING)
        if value is _MISSING:
            value = _default_in_module(module, name)
    return None if value is _MISSING else value


def fill_placeholders(*, text: str, config: Mapping[str, Any], module: ModuleType | None = None) -> str:
    """Fill ``{name}`` / ``{name:spec}`` placeholders (see :func:`placeholder_value`).

    A placeholder nothing names becomes ``[name]``, visibly a value for the
    author to fill in; braces that are not placeholders stay as written.
    """

    def fill(match: re.Match[str]) -> str:
        value = placeholder_value(name=match["name"], config=config, module=module)
        return f"[{match['name']}]" if value is None else format_value(value, match["spec"] or "")

    return _PLACEHOLDER.sub(fill, text)
