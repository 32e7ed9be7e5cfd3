"""`bh plan`: the cost plan of a configured cohort, before anything runs."""

from __future__ import annotations

import re

import yaml

from bh_models.cli import main
from bh_models.core.batches import bucket_of
from tests.conftest import REPO, write_bids


def _config(tmp_path, roots: dict) -> str:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"] = roots
    config["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def test_plan_prints_units_jobs_submissions_hours_and_storage(tmp_path, capsys):
    labels = [f"{i:04d}" for i in range(300)]
    big = write_bids(tmp_path / "big", {label: {} for label in labels})
    small = write_bids(tmp_path / "small", {"a1": {}, "a2": {"t1w": False}, "a3": {}})
    config = _config(tmp_path, {
        "big": {"bids_root": str(big), "role": "pretrain"},
        "small": {"bids_root": str(small), "role": "downstream",
                  "targets": {"diagnosis": {"column": "diagnosis", "type": "classification", "positive": "patient"}}},
    })
    assert main(["plan", config]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():  # the first line of each name: the datasets, then the jobs table
        if line.strip():
            rows.setdefault(line.split()[0], line.split())
    # Subjects and runs per dataset (a2 has BOLD but no T1w: a problem, left out).
    assert rows["big"][2:7] == ["300", "300", "300", "0", str(len({bucket_of(x, 1000) for x in labels}))]
    assert rows["small"][2:6] == ["2", "2", "2", "1"]
    buckets = len({bucket_of(x, 1000) for x in labels}) + len({bucket_of(x, 1000) for x in ("a1", "a3")})
    assert rows["anat_preprocess"][1] == str(buckets) and rows["func_preprocess"][1] == str(buckets)
    group = next(line for line in out.splitlines() if line.startswith("preproc group"))
    assert re.search(rf"\b{buckets}\b", group)  # one submission per batch pair (group-components 1)
    for heading in ("CPU-hours", "GPU-hours of pretraining", "storage class", "anat: transforms",
                    "store: fmri shards", "models: checkpoints", "compact_storage off", "planned in"):
        assert heading in out, heading
    assert "unknown (headers unreadable)" in out  # zero-byte images: the measured demo run is assumed


def test_plan_refuses_the_documented_example(capsys):
    assert main(["plan", str(REPO / "workflow" / "examples" / "paper_protocol.yaml")]) == 2
    assert "placeholders" in capsys.readouterr().err
