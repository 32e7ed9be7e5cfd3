"""Measured costs of the workflow's steps, and the resources and plans derived from them.

``bh_models/core/costs.tsv`` is written by ``benchmarks/bench_costs.py`` (never by
hand): one row per measured quantity, in long form,

``rule``
    the rule (or ``storage`` for bytes of a derivative class);
``quantity``
    ``seconds`` (wall time, one thread), ``peak_mb`` (peak resident memory of
    the process), ``bytes`` (disk), ``flops`` (per training sample);
``per``
    what one value is for: ``unit`` (a subject's T1w or a BOLD run),
    ``frame`` (one volume of a BOLD run), ``job``, ``subject``, ``run``, ``sample``;
``item``
    the derivative class for ``bytes`` rows (``transforms``, ``mni``, ...), else empty;
``value``
    the measurement;
``setting``
    the configuration it was measured at (``resolution=2`` ...), compared with
    the run's config by :func:`setting_matches`;
``source``
    the benchmark, the data and the machine.

Rules ask for their resources through :func:`batch_resources` and
:func:`job_resources`: the measured peak and time with :data:`HEADROOM`, times
Snakemake's ``attempt`` (1 on the first try, 2 and 3 on the SLURM profile's
retries), so a job that ran out of memory or time is retried with more.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

COSTS_PATH = Path(__file__).resolve().with_name("costs.tsv")
COST_COLUMNS = ["rule", "quantity", "per", "item", "value", "setting", "source"]

#: Multipliers on measured peaks and times: runs differ from the benchmark's data.
HEADROOM = {"mem_mb": 1.5, "runtime": 2.0}
#: Memory of the batch job's own process (it only schedules units and writes manifests).
BATCH_BASE_MB = 400
#: Smallest resources a job asks for.
MIN_MEM_MB, MIN_RUNTIME_MIN = 500, 5


@functools.lru_cache(maxsize=4)
def load_costs(path: str | Path = COSTS_PATH) -> pd.DataFrame:
    """The measured costs (columns :data:`COST_COLUMNS`)."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = set(COST_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: columns {sorted(missing)} missing; rerun benchmarks/bench_costs.py")
    table["value"] = table["value"].astype(float)
    return table


def parse_setting(text: str) -> dict[str, str]:
    """``"resolution=2;tensor_grid=80x96x80"`` -> ``{"resolution": "2", "tensor_grid": "80x96x80"}``."""
    return dict(part.split("=", 1) for part in text.split(";") if "=" in part)


def config_setting(config: Mapping[str, Any]) -> dict[str, str]:
    """The config values the costs depend on, in the form of the ``setting`` column."""
    anat = config.get("anat", {})
    grid = anat.get("tensor_grid", [160, 192, 160])
    return {
        "resolution": f"{float(config.get('template', {}).get('resolution', 2)):g}",
        "registration_resolution": f"{float(anat.get('registration_resolution', 2)):g}",
        "tensor_grid": "x".join(str(int(n)) for n in grid),
        "skullstrip": str(anat.get("skullstrip", "deepbet")),
        "type_of_transform": str(anat.get("type_of_transform", "SyN")),
    }


def setting_matches(setting: str, config: Mapping[str, Any]) -> bool:
    """True when every key of a ``setting`` cell equals the config's value."""
    wanted = config_setting(config)
    return all(wanted.get(key, value) == value for key, value in parse_setting(setting).items())


@functools.lru_cache(maxsize=4)
def _cost_index(path: str | Path = COSTS_PATH) -> dict[tuple[str, str, str, str], list[tuple[dict, float]]]:
    # Planning asks for costs thousands of times (resources of every batch job): a dict, not pandas.
    index: dict[tuple[str, str, str, str], list[tuple[dict, float]]] = {}
    table = load_costs(path)
    for rule, quantity, per, item, value, setting in zip(table["rule"], table["quantity"], table["per"],
                                                         table["item"], table["value"], table["setting"]):
        index.setdefault((rule, quantity, per, item), []).append((parse_setting(setting), float(value)))
    return index


def cost(rule: str, quantity: str, *, per: str = "unit", item: str = "", config: Mapping[str, Any] | None = None,
         costs: pd.DataFrame | None = None) -> tuple[float, bool]:
    """A measured value, and whether it was measured at the config's setting.

    The row whose setting matches the config wins; without one, the row with
    the most matching keys (ties: the first) is returned with ``False``, so a
    caller can say the figure is taken from another setting.

    Raises
    ------
    KeyError
        When nothing was measured for ``rule``/``quantity``/``per``/``item``.
    """
    if costs is not None:
        rows = [(parse_setting(s), float(v)) for r, q, p, i, v, s in zip(
            costs["rule"], costs["quantity"], costs["per"], costs["item"], costs["value"], costs["setting"])
            if (r, q, p, i) == (rule, quantity, per, item)]
    else:
        rows = _cost_index().get((rule, quantity, per, item), [])
    if not rows:
        raise KeyError(f"no measured {quantity} per {per} for {rule} {item}".strip())
    if config is None:
        return rows[0][1], True
    wanted = config_setting(config)
    scored = []
    for position, (parsed, value) in enumerate(rows):
        agree = sum(wanted.get(k) == v for k, v in parsed.items())
        scored.append((agree == len(parsed), agree, -position, value))
    exact, _, _, value = max(scored)
    return value, exact


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def batch_resources(*, rule: str, units: int, workers: int, attempt: int = 1,
                    config: Mapping[str, Any] | None = None, frames: float | None = None) -> dict[str, int]:
    """``mem_mb`` and ``runtime`` (minutes) of a batch job from the measured per-unit peak and time.

    Memory: :data:`BATCH_BASE_MB` plus one unit's peak per worker; time: the
    units a worker runs one after the other. Both with :data:`HEADROOM`, times
    ``attempt``. ``frames`` (BOLD volumes per run) scales the functional time,
    which grows with the run's length, when the table has a per-frame row.
    """
    workers = max(1, min(int(workers), max(1, int(units))))
    peak, _ = cost(rule, "peak_mb", config=config)
    seconds, _ = cost(rule, "seconds", config=config)
    if frames is not None:
        try:
            per_frame, _ = cost(rule, "seconds", per="frame", config=config)
            seconds += per_frame * float(frames)
        except KeyError:
            pass
    rounds = math.ceil(max(1, int(units)) / workers)
    mem = (BATCH_BASE_MB + peak * workers) * HEADROOM["mem_mb"] * attempt
    runtime = rounds * seconds / 60.0 * HEADROOM["runtime"] * attempt
    return {"mem_mb": max(MIN_MEM_MB, _round_up(mem, 100)), "runtime": max(MIN_RUNTIME_MIN, _round_up(runtime, 1))}


def job_resources(*, rule: str, units: int = 1, attempt: int = 1,
                  config: Mapping[str, Any] | None = None) -> dict[str, int]:
    """``mem_mb`` and ``runtime`` of a one-process job whose cost grows with ``units`` (runs, subjects).

    Uses the rule's ``per job`` row plus its ``per unit`` row times ``units``
    when the table has one, with :data:`HEADROOM`, times ``attempt``.
    """
    values = {}
    for quantity in ("peak_mb", "seconds"):
        total, _ = cost(rule, quantity, per="job", config=config)
        try:
            per_unit, _ = cost(rule, quantity, per="unit", config=config)
            total += per_unit * max(0, int(units))
        except KeyError:
            pass
        values[quantity] = total
    mem = values["peak_mb"] * HEADROOM["mem_mb"] * attempt
    runtime = values["seconds"] / 60.0 * HEADROOM["runtime"] * attempt
    return {"mem_mb": max(MIN_MEM_MB, _round_up(mem, 100)), "runtime": max(MIN_RUNTIME_MIN, _round_up(runtime, 1))}
