"""A pretraining job given two "GPUs" runs as two torchrun processes (DDP, gloo on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bh_models.core.step import run_under_torchrun
from bh_models.store.shards import pack_t1
from bh_models.models.train import load_checkpoint


def _t1_store(root: Path, n_subjects: int = 8) -> Path:
    rng = np.random.default_rng(0)
    tensors = root / "tensors"
    tensors.mkdir(parents=True)
    paths = []
    for i in range(n_subjects):
        path = tensors / f"sub-{i:02d}_desc-encoder_T1w.npy"
        np.save(path, rng.standard_normal((32, 32, 32)).astype(np.float32))
        paths.append(path)
    splits = root / "store" / "splits" / "synth.tsv"
    splits.parent.mkdir(parents=True)
    pd.DataFrame({"dataset": "synth", "subject": [f"{i:02d}" for i in range(n_subjects)], "split": "train",
                  "stratum": "", "n_fmri_samples": 0, "n_t1": 1}).to_csv(splits, sep="\t", index=False)
    pack_t1(t1_tensors=paths, splits=splits, dataset="synth", out_dir=root / "store" / "t1" / "synth")
    return root / "store"


def test_two_process_torchrun_job_trains_and_rank0_records(tmp_path):
    store = _t1_store(tmp_path)
    models = tmp_path / "results" / "models"
    job = {
        "step": "bh_models.models.pretrain:pretrain_t1", "rule": "pretrain_t1", "wildcards": {},
        "inputs": {"t1": [str(store / "t1" / "synth")]}, "outputs": {"out_checkpoint": str(models / "checkpoint.pt"),
                                  "out_metrics": str(models / "metrics.tsv"),
                                  "out_curve": str(models / "loss_curve.png")},
        "params": {"model_size": "tiny", "steps": 4, "batch_size": 2, "lr": 1e-3,
                   "seed": 3, "checkpoint_every": 2},
        "config": {"results_dir": str(tmp_path / "results"), "seed": 3}, "threads": 1,
        "log_file": str(tmp_path / "results" / "logs" / "pretrain_t1.log"),
    }
    run_under_torchrun(job, nproc=2)
    metrics = pd.read_csv(models / "metrics.tsv", sep="\t")
    assert metrics["step"].tolist() == [1, 2, 3, 4] and np.isfinite(metrics["loss"]).all()
    checkpoint = load_checkpoint(models / "checkpoint.pt")
    assert checkpoint["step"] == 4
    # Both processes logged; only rank 0 wrote the provenance record.
    assert (tmp_path / "results" / "logs" / "pretrain_t1.log.rank1").is_file()
    records = list((tmp_path / "results" / "provenance" / "pretrain_t1").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["rule"] == "pretrain_t1"
