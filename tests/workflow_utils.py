"""Helpers of the workflow tests: a working folder per run, snakemake as a subprocess, manifests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from bh_models.core import hashing

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "workflow" / "Snakefile"
VENV_BIN = Path(sys.executable).parent

# Parts of the results folder that legitimately differ between two runs:
# provenance records and logs hold times, hosts and job ids; Snakemake's own
# metadata; the hash cache holds file stat stamps.
VOLATILE_TOP_LEVEL = ("provenance", "logs", ".snakemake", ".cache")
# Files that embed the audit of *this* run's provenance (times differ), and the
# derivative dataset_description.json (it names the code checkout).
VOLATILE_FILES = ("qc/audit.tsv", "qc/audit.html")


def make_workdir(workdir: Path, demo_root: Path, **overrides) -> Path:
    """A run folder: config.yaml (the project's, BIDS roots pointing at ``demo_root``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for name, entry in config["datasets"].items():
        entry["bids_root"] = str(demo_root / name)
    for key, value in overrides.items():
        config[key] = value
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


def snakemake(workdir: Path, *args: str, timeout: float = 1800, check: bool = True,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the workflow in ``workdir`` (its config.yaml) and return the finished process."""
    full_env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), *args],
        cwd=workdir, capture_output=True, text=True, timeout=timeout, env=full_env,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    return done


def sha256_file(path: Path) -> str:
    return hashing.sha256_file(path=path)


def manifest(root: Path, *, skip_top: tuple[str, ...] = (), skip_files: tuple[str, ...] = ()) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel.split("/")[0] in skip_top or rel in skip_files:
            continue
        out[rel] = sha256_file(path)
    return out


# Timing measurements inside otherwise reproducible files: compared without them.
TIMING_JSON_KEYS = {"_desc-preproc_T1w.json": "Timing"}
TIMING_TSV_COLUMNS = {"_desc-anat_qc.tsv": "seconds", "metrics.tsv": "samples_per_s"}


def comparable_sha256(path: Path) -> str:
    """sha256 of a file, or of its content without the timing fields listed above."""
    for suffix, key in TIMING_JSON_KEYS.items():
        if path.name.endswith(suffix):
            data = json.loads(path.read_text())
            data.pop(key, None)
            return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    for suffix, column in TIMING_TSV_COLUMNS.items():
        if path.name.endswith(suffix):
            text = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False).drop(columns=[column])
            return hashlib.sha256(text.to_csv(sep="\t", index=False).encode()).hexdigest()
    return sha256_file(path)


def results_manifest(workdir: Path) -> dict[str, str]:
    """relative path -> comparable sha256 of every data file of a run's results."""
    root = workdir / "results"
    plain = manifest(root, skip_top=VOLATILE_TOP_LEVEL, skip_files=VOLATILE_FILES)
    return {rel: comparable_sha256(root / rel) for rel in plain}
