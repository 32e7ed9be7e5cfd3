"""Run one bh_models step function for a Snakemake job.

Every rule is a declaration whose ``script:`` is ``workflow/scripts/step.py``,
two lines that call :func:`run_snakemake_job`. The rule's ``params.step`` names
the function (``"bh_models.anat.preprocess:preprocess_anat"``); its named inputs, named
outputs and other params become the function's keyword arguments. This one
place then does what every job needs and no step should repeat:

- logging to the rule's ``log:`` file;
- thread limits for numpy/torch/ITK from the rule's ``threads``;
- on success, a provenance record (inputs and outputs with sha256, params,
  config hash, versions, host, SLURM job id, times, seed);
- inputs named ``listed_<arg>`` are batch manifests: the step receives ``<arg>``,
  the files the manifests list for it (:mod:`bh_models.core.batches`), and, when
  it takes a ``<arg>_datasets`` parameter the rule does not set, each file's
  dataset; the provenance record lists the manifests and the files;
- a rule with a ``batch_units`` param is a batch job: its ``params.step`` is
  the *unit* step, run once per unit by :func:`bh_models.core.batches.run_units`,
  which writes one provenance or exclusion record per unit;
- a step that takes ``job_context`` receives the job's rule, wildcards, config
  and results folder (:class:`bh_models.core.batches.JobContext`).

A job-level ``BHInputError`` (a dataset-level file is unusable) fails the job
with its message; exclusion records are per unit, written by batch jobs only.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bh_models.core.errors import BHInputError

log = logging.getLogger("bh_models")


def resolve(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# The environment variables that cap numerical libraries' threads (set by limit_threads).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "NUMEXPR_NUM_THREADS")


def limit_threads(threads: int) -> None:
    """Keep numerical libraries to the cores the scheduler gave this job."""
    value = str(max(1, int(threads)))
    for var in THREAD_VARIABLES:
        os.environ[var] = value
    try:
        import torch

        torch.set_num_threads(int(value))
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Use ``threads`` torch intra-op threads inside the block, then restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _named(items: Any) -> dict[str, Any]:
    """Named entries of a Snakemake Namedlist as plain str / list[str]."""
    out: dict[str, Any] = {}
    for name, value in items.items():
        out[name] = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
    return out


def _as_lists(named: Mapping[str, Any]) -> dict[str, list[str]]:
    return {k: (v if isinstance(v, list) else [v]) for k, v in named.items()}


def _coerce_paths(named: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ([Path(x) for x in v] if isinstance(v, list) else Path(v)) for k, v in named.items()}


#: Named inputs/outputs with this prefix are declared for Snakemake and hashed into
#: provenance, but not passed to the step function (sidecars the step writes next
#: to its outputs, or the files inside a folder given to it as a param).
DEPENDENCY_PREFIX = "dep_"

#: The step every batch job runs (it calls the rule's unit step once per unit).
BATCH_STEP = "bh_models.core.batches:run_units"


def _passed(named: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in named.items() if not k.startswith(DEPENDENCY_PREFIX)}


def with_sidecars(outputs: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Declared outputs plus the JSON sidecars the step wrote beside them.

    Steps write a sidecar next to most data files; recording them keeps the
    audit from calling them orphans without declaring each one in the rules.
    """
    from bh_models.core.jsonio import sidecar_path

    declared = {os.path.normpath(p) for paths in outputs.values() for p in paths}
    extra = sorted({
        os.path.normpath(sidecar_path(p)) for paths in outputs.values() for p in paths
        if os.path.isfile(p) and sidecar_path(p).is_file()
    } - declared)
    return {**outputs, **({"sidecars": extra} if extra else {})}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def expand_listed(inputs: Mapping[str, Any], func: Callable[..., Any],
                  params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[str]]]:
    """Split a job's inputs into the step's keyword arguments, extra params and what provenance records.

    Returns ``(kwargs, extra_params, recorded)``: ``listed_<arg>`` manifests become
    ``kwargs[<arg>]`` (the listed files) and, when ``func`` takes ``<arg>_datasets``
    and ``params`` lacks it, ``extra_params[<arg>_datasets]``; ``recorded`` holds the
    manifests under their own name and the listed files under ``<arg>``.
    """
    from bh_models.core.batches import LISTED_COLUMNS, LISTED_PREFIX, listed_files

    accepted = inspect.signature(func).parameters
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    recorded = _as_lists(inputs)
    for name, value in _passed(inputs).items():
        if not name.startswith(LISTED_PREFIX):
            kwargs[name] = value
            continue
        arg = name[len(LISTED_PREFIX):]
        if arg not in LISTED_COLUMNS:
            raise ValueError(f"input {name}: no manifest column is known for '{arg}' (core.batches.LISTED_COLUMNS)")
        manifests = value if isinstance(value, list) else [value]
        files = listed_files(manifests=manifests, column=LISTED_COLUMNS[arg])
        kwargs[arg] = [path for path, _ in files]
        recorded[arg] = [path for path, _ in files]
        if f"{arg}_datasets" in accepted and f"{arg}_datasets" not in params:
            extra[f"{arg}_datasets"] = [dataset for _, dataset in files]
    return kwargs, extra, recorded


def run_job(
    *,
    step: str,
    rule: str,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    params: Mapping[str, Any],
    wildcards: Mapping[str, str],
    config: Mapping[str, Any],
    threads: int = 1,
    log_file: str | None = None,
) -> Any:
    """Call the step function and record its provenance.

    Parameters
    ----------
    step
        ``"module:function"`` of the step function.
    inputs, outputs
        Named paths (str or list of str); passed as :class:`~pathlib.Path`.
    params
        Other keyword arguments of the step function (JSON-able).
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limit_threads(threads)
    results_dir = Path(config.get("results_dir", "results"))
    started = _now()
    t0 = time.perf_counter()
    log.info("rule %s %s: %s", rule, dict(wildcards), step)
    try:
        func = resolve(step)
        kwargs, extra, recorded_inputs = expand_listed(inputs, func, params)
        context = {}
        if "job_context" in inspect.signature(func).parameters:
            from bh_models.core.batches import JobContext

            context["job_context"] = JobContext(rule=rule, wildcards=dict(wildcards), config=dict(config),
                                                results_dir=str(results_dir), log_file=log_file)
        result = func(**_coerce_paths(kwargs), **_coerce_paths(_passed(outputs)), **params, **extra, **context,
                      threads=threads)
    except BHInputError as exc:
        log.error("bad input: %s", exc)
        raise
    except Exception:
        log.error("step %s failed:\n%s", step, traceback.format_exc())
        raise
    log.info("done in %.1f s", time.perf_counter() - t0)
    if int(os.environ.get("RANK", "0")) != 0:
        return result  # under torchrun, only rank 0 records
    from bh_models.core.provenance import record_job

    record_job(
        results_dir=results_dir, rule=rule, wildcards=dict(wildcards),
        inputs=recorded_inputs, outputs=with_sidecars(_as_lists(outputs)), params=dict(params),
        config=dict(config), seed=params.get("seed", config.get("seed")),
        started=started, finished=_now(), log=log_file,
        bids_roots={name: entry["bids_root"] for name, entry in config.get("datasets", {}).items()},
    )
    return result


def run_snakemake_job(smk: Any) -> Any:
    """Entry point for ``script:`` directives (``smk`` is Snakemake's object).

    A job that got more than one GPU (``resources: gpu``) runs under
    ``torchrun --standalone``, one process per GPU; every process calls the
    same step function, which reads torchrun's environment (DDP).
    """
    params = dict(smk.params.items())
    step = params.pop("step")
    if "batch_units" in params:  # a batch job: the rule's step is the unit step
        params = {"unit_step": step, **params}
        step = BATCH_STEP
    nproc = int(getattr(smk.resources, "gpu", 0) or 0)
    job = dict(
        step=step, rule=smk.rule, inputs=_named(smk.input), outputs=_named(smk.output),
        params=params, wildcards=dict(smk.wildcards.items()), config=dict(smk.config),
        threads=smk.threads, log_file=str(smk.log[0]) if len(smk.log) else None,
    )
    if nproc > 1:
        return run_under_torchrun(job, nproc=nproc)
    return run_job(**job)


def run_under_torchrun(job: Mapping[str, Any], *, nproc: int) -> None:
    """Run one job as ``nproc`` torchrun processes (DDP); the job spec travels as JSON."""
    import json
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(job, fh, default=str)
    try:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", "-m", "bh_models.core.step", fh.name], check=True)
    finally:
        os.unlink(fh.name)


def main(argv: list[str] | None = None) -> int:
    """``python -m bh_models.core.step JOB.json``: one process of a torchrun job."""
    import json

    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as fh:
        job = json.load(fh)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 and job.get("log_file"):
        job["log_file"] = f"{job['log_file']}.rank{rank}"
    run_job(**job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
