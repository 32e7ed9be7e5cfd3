"""Shared fixtures: small BIDS layouts built on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest

REPO = Path(__file__).resolve().parent.parent


def write_bids(root: Path, subjects: dict[str, dict], *, top_tr: float | None = 2.0) -> Path:
    """Write a zero-byte BIDS layout.

    ``subjects`` maps a label to options: ``t1w`` (bool), ``runs`` (list of
    BOLD entity strings like "task-rest_run-1"), ``run_tr`` (sidecar TR or None).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    if top_tr is not None:
        (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": top_tr}))
    lines = ["participant_id\tdiagnosis\tscore"]
    for i, (label, opts) in enumerate(subjects.items()):
        sub = root / f"sub-{label}"
        if opts.get("t1w", True):
            (sub / "anat").mkdir(parents=True, exist_ok=True)
            (sub / "anat" / f"sub-{label}_T1w.nii.gz").touch()
        for ents in opts.get("runs", ["task-rest"]):
            (sub / "func").mkdir(parents=True, exist_ok=True)
            (sub / "func" / f"sub-{label}_{ents}_bold.nii.gz").touch()
            if opts.get("run_tr") is not None:
                (sub / "func" / f"sub-{label}_{ents}_bold.json").write_text(
                    json.dumps({"RepetitionTime": opts["run_tr"]}))
        lines.append(f"sub-{label}\t{'patient' if i % 2 else 'control'}\t{i * 1.5}")
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def bids_factory(tmp_path):
    def make(name: str = "ds", subjects: dict | None = None, **kwargs) -> Path:
        subjects = subjects if subjects is not None else {"01": {}, "02": {}}
        return write_bids(tmp_path / name, subjects, **kwargs)

    return make


@pytest.fixture(autouse=True)
def _thread_caps_do_not_leak():
    """A step run in-process caps threads for its job (core.step.limit_threads); undo that
    after each test so later tests, and the daemons and workflows they start, see all cores."""
    import os

    import torch

    from bh_models.core.step import THREAD_VARIABLES

    saved = {var: os.environ.get(var) for var in THREAD_VARIABLES}
    threads = torch.get_num_threads()
    yield
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- workflow runs (test_workflow, test_slurm)

@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo cohort, written once per session (outside any run folder)."""
    from bh_models.demo.cohort import write_demo_cohort

    root = tmp_path_factory.mktemp("demo")
    write_demo_cohort(root, seed=0)
    return root


@pytest.fixture(scope="session")
def reference_stages(tmp_path_factory, demo_root) -> dict:
    """The demo workflow, run as a user grows a cohort: first the pretraining sites alone (a
    finished pretraining run), then the downstream site added to config.yaml and run again.

    Returns the run folder, the checkpoints' sha256 after the first stage, the second
    stage's dry-run plan, and wall times. Its pretraining sites' files and checkpoints are
    byte for byte what a clean run writes (``test_sigkilled_clean_run_reruns_to_identical_files``),
    and the downstream site's what a SLURM rerun writes (``test_slurm``).
    """
    import time

    import yaml

    from workflow_utils import make_workdir, manifest, sha256_file, snakemake

    raw_before = manifest(demo_root)
    workdir = make_workdir(tmp_path_factory.mktemp("run_a"), demo_root)
    full = yaml.safe_load((workdir / "config.yaml").read_text())
    downstream = [name for name, entry in full["datasets"].items() if entry.get("role") == "downstream"]
    first = {**full, "datasets": {k: v for k, v in full["datasets"].items() if k not in downstream}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(first, sort_keys=False))
    started = time.perf_counter()
    snakemake(workdir, "--cores", "2")
    pretraining_seconds = time.perf_counter() - started
    models = workdir / "results" / "models"
    checkpoints = {p.relative_to(models).as_posix(): sha256_file(p) for p in sorted(models.rglob("*.pt"))}

    (workdir / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    plan = snakemake(workdir, "-n", "--cores", "2").stdout
    started = time.perf_counter()
    snakemake(workdir, "--cores", "2")
    adding_seconds = time.perf_counter() - started
    print(f"demo: pretraining run {pretraining_seconds:.0f} s, adding {downstream} {adding_seconds:.0f} s")
    assert manifest(demo_root) == raw_before, "the workflow wrote into the raw BIDS folders"
    return {"workdir": workdir, "checkpoints": checkpoints, "plan": plan, "downstream": downstream,
            "pretraining_seconds": pretraining_seconds, "adding_seconds": adding_seconds}


@pytest.fixture(scope="session")
def reference_run(reference_stages) -> Path:
    """The whole demo run (both stages of :func:`reference_stages`)."""
    return reference_stages["workdir"]
