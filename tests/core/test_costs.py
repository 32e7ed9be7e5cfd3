"""Measured costs (bh_models.core.costs): lookups by setting, resources that grow with retries,
and the pieces of `bh plan` (jobs, SLURM submissions, CPU/GPU-hours, storage)."""

from __future__ import annotations

import pandas as pd
import pytest

from bh_models.core.config import load_config
from bh_models.core.costs import (
    COST_COLUMNS,
    DatasetCounts,
    batch_resources,
    cost,
    cpu_hours,
    gpu_hours,
    job_resources,
    load_costs,
    slurm_submissions,
    storage_bytes,
    workflow_jobs,
)
from tests.conftest import REPO


@pytest.fixture(scope="module")
def demo_config() -> dict:
    return load_config(REPO / "config.yaml", base_dir=REPO)


def _table(rows: list[tuple]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COST_COLUMNS)
    table["value"] = table["value"].astype(float)
    return table


def test_the_measured_table_covers_every_rule_that_reads_it():
    table = load_costs()
    for rule in ("anat_preprocess", "func_preprocess"):
        for quantity in ("seconds", "peak_mb"):
            assert cost(rule, quantity)[0] > 0
    for rule in ("index_dataset", "anat_qc_table", "func_qc_table", "augment_samples", "make_splits", "pack_fmri",
                 "pack_t1", "exclusion_table", "audit"):
        assert {"seconds", "peak_mb"} <= set(table.loc[table["rule"] == rule, "quantity"]), rule
    assert (table["source"].str.contains("bench_costs.py")).all()


def test_cost_prefers_the_row_measured_at_the_configs_setting(demo_config):
    table = _table([
        ("anat_preprocess", "seconds", "unit", "", 100.0, "resolution=2;tensor_grid=160x192x160", "b"),
        ("anat_preprocess", "seconds", "unit", "", 40.0, "resolution=2;tensor_grid=80x96x80", "b"),
    ])
    assert cost("anat_preprocess", "seconds", config=demo_config, costs=table) == (40.0, True)
    other = {**demo_config, "anat": {**demo_config["anat"], "tensor_grid": [96, 112, 96]}}
    value, exact = cost("anat_preprocess", "seconds", config=other, costs=table)
    assert not exact and value in (100.0, 40.0)
    with pytest.raises(KeyError, match="no measured peak_mb"):
        cost("anat_preprocess", "peak_mb", costs=table)


def test_resources_grow_with_the_attempt_the_workers_and_the_run_size(demo_config):
    first = batch_resources(rule="func_preprocess", units=70, workers=1, attempt=1, config=demo_config)
    retry = batch_resources(rule="func_preprocess", units=70, workers=1, attempt=2, config=demo_config)
    assert retry == {"mem_mb": 2 * first["mem_mb"], "runtime": 2 * first["runtime"]}
    parallel = batch_resources(rule="func_preprocess", units=70, workers=8, attempt=1, config=demo_config)
    assert parallel["mem_mb"] > first["mem_mb"] and parallel["runtime"] < first["runtime"]
    bigger = batch_resources(rule="func_preprocess", units=70, workers=1, config=demo_config, mvoxel_frames=260)
    assert bigger["runtime"] > first["runtime"] and bigger["mem_mb"] >= first["mem_mb"]
    # Never more workers than units: a one-subject batch asks for one unit's memory.
    assert batch_resources(rule="anat_preprocess", units=1, workers=8, config=demo_config) == \
        batch_resources(rule="anat_preprocess", units=1, workers=1, config=demo_config)
    small = job_resources(rule="pack_fmri", units=10, config=demo_config)
    large = job_resources(rule="pack_fmri", units=70_933, attempt=3, config=demo_config)
    assert large["runtime"] > 3 * small["runtime"] and large["mem_mb"] >= 3 * small["mem_mb"]


def _counts(name="big", role="pretrain", subjects=1000, labels=600, tasks=0):
    batches = tuple((f"{i:04d}", True, True) for i in range(labels))
    return DatasetCounts(name=name, role=role, subjects=subjects, anat_units=subjects, func_units=subjects,
                         problems=0, batch_labels=batches, tasks=tasks, run_mvoxel_frames=None, run_frames=None,
                         repetition_time=0.735)


def test_jobs_and_submissions(demo_config):
    datasets = [_counts(), _counts(name="down", role="downstream", subjects=100, labels=95, tasks=2)]
    jobs = workflow_jobs(datasets=datasets, config=demo_config)
    assert jobs["anat_preprocess"] == jobs["func_preprocess"] == 695
    assert jobs["pack_fmri"] == 1 and jobs["evaluate_dataset"] == 1 and "evaluate_pooled" not in jobs
    submissions = slurm_submissions(datasets=datasets, jobs=jobs, group_components=1)
    grouped = next(iter(submissions))
    assert submissions[grouped] == 695 and "all" not in submissions
    assert slurm_submissions(datasets=datasets, jobs=jobs, group_components=10)[grouped] == 70
    assert sum(submissions.values()) == 695 + sum(v for k, v in jobs.items()
                                                  if k not in ("anat_preprocess", "func_preprocess", "all"))


def test_hours_and_storage_scale_with_the_units(demo_config):
    one, ten = [_counts(subjects=100, labels=90)], [_counts(subjects=1000, labels=630)]
    for hours in (cpu_hours, ):
        small = hours(datasets=one, jobs=workflow_jobs(datasets=one, config=demo_config), config=demo_config)
        large = hours(datasets=ten, jobs=workflow_jobs(datasets=ten, config=demo_config), config=demo_config)
        assert large["anat_preprocess"] == pytest.approx(10 * small["anat_preprocess"])
        assert large["func_preprocess"] == pytest.approx(10 * small["func_preprocess"])
    full = {**demo_config, "pretrain": {**demo_config["pretrain"], "model_size": "base",
                                        "fmri": {"steps": 100_000, "batch_size": 32}}}
    gpu = gpu_hours(datasets=one, config=full, gpu_tflops=350.0)
    assert gpu["pretrain_fmri"] > 0
    assert gpu_hours(datasets=one, config=full, gpu_tflops=700.0)["pretrain_fmri"] == \
        pytest.approx(gpu["pretrain_fmri"] / 2)
    storage = storage_bytes(datasets=ten, config=demo_config)
    for row in storage.values():
        assert row["total"] == pytest.approx(row["per_unit"] * row["units"])
    assert storage["anat: transforms_exact"]["per_unit"] > 2 * storage["anat: transforms"]["per_unit"]
