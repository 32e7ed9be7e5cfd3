"""GPU memory model: the tensor tracker, the measured table, the fit check, and bh check-config's report."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from bh_models.core.config import check_config, load_schema
from bh_models.models.memory import (
    GIB,
    MemoryModel,
    TensorMemoryTracker,
    fit_report,
    load_memory_table,
    model_tokens,
    usable_bytes,
)
from tests.conftest import REPO, write_bids


def test_tracker_counts_live_storages_and_their_peak():
    tracker = TensorMemoryTracker()
    weight = torch.randn(100, 1000, requires_grad=True)  # 400 kB
    tracker.register(weight)
    assert tracker.current == 400_000
    with tracker:
        x = torch.randn(50, 100)  # 20 kB
        hidden = (x @ weight).relu()  # the matmul output is freed after relu: 200 kB live at a time
        assert tracker.current == 400_000 + 20_000 + 200_000
        view = hidden[:10]  # a view adds nothing
        assert tracker.current == 620_000
        hidden.sum().backward()  # the gradient of weight, 400 kB
        del x, hidden, view
        assert tracker.current == 800_000
    assert tracker.peak >= 400_000 + 20_000 + 200_000 + 200_000  # matmul output and relu output together
    assert tracker.peak <= 400_000 + 20_000 + 3 * 200_000 + 400_000


def test_fit_report_arithmetic():
    table = {"harmonizer": MemoryModel(model="harmonizer", fixed_bytes=2 * GIB,
                                       per_sample_bytes={False: 4 * GIB, True: 1 * GIB}, tokens=1000)}
    usable = usable_bytes(80) / GIB
    assert usable == pytest.approx((80 - 4) * 0.9)
    rows = fit_report(training={"harmonizer": {"batch_size": 17, "activation_checkpointing": False}},
                      gpu_memory_gb=80, tokens={"harmonizer": 1000}, table=table)
    row = rows[0]
    assert row["predicted_gb"] == pytest.approx(2 + 17 * 4) and not row["fits"]
    assert row["max_batch"] == int((usable - 2) // 4) and row["max_batch_other"] == int((usable - 2) // 1)
    # Twice the tokens (more patches): twice the bytes per sample.
    doubled = fit_report(training={"harmonizer": {"batch_size": 8, "activation_checkpointing": True}},
                         gpu_memory_gb=80, tokens={"harmonizer": 2000}, table=table)[0]
    assert doubled["predicted_gb"] == pytest.approx(2 + 8 * 2) and doubled["fits"]


def schema_training_defaults() -> dict:
    pretrain = load_schema()["properties"]["pretrain"]["properties"]
    return {model: {key: pretrain[section]["properties"][key]["default"]
                    for key in ("batch_size", "activation_checkpointing")}
            for section, model in (("fmri", "harmonix_f"), ("t1", "harmonix_s"), ("harmonizer", "harmonizer"))}


def test_the_measured_table_covers_every_model_and_the_defaults_fit_an_h100():
    table = load_memory_table()
    assert set(table) == {"harmonix_f", "harmonix_s", "harmonizer"}
    for memory in table.values():
        assert memory.per_sample_bytes[True] < memory.per_sample_bytes[False]  # checkpointing saves memory
    tokens = {name: model_tokens(model=name, n_rois=400, max_patches=18, t1_grid=(160, 192, 160)) for name in table}
    rows = fit_report(training=schema_training_defaults(), gpu_memory_gb=80, tokens=tokens, table=table)
    for row in rows:
        assert row["fits"], row
        assert row["batch_size"] <= 0.9 * row["max_batch"] + 1, row  # a margin beyond the allocator's


def paper_config(tmp_path, **harmonizer):
    raw = yaml.safe_load((REPO / "workflow" / "examples" / "paper_protocol.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw.setdefault("pretrain", {}).setdefault("harmonizer", {}).update(harmonizer)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_check_config_shows_effective_settings_and_warns_on_a_batch_that_will_not_fit(tmp_path, capsys):
    from bh_models.cli import main

    assert main(["check-config", str(paper_config(tmp_path))]) == 0
    out, err = capsys.readouterr()
    assert "harmonizer (harmonizer): 100000 steps, batch 8 per process x 2 accumulation x 8 GPU(s) = 128" in out
    assert "peak lr 0.00025 = 0.0005 x 128 / 256" in out
    assert "GPU memory:" in out and "DOES NOT FIT" not in out and "warning" not in err
    assert main(["check-config", str(paper_config(tmp_path, batch_size=64, activation_checkpointing=False))]) == 0
    out, err = capsys.readouterr()
    assert "DOES NOT FIT" in out
    assert "warning: pretrain.harmonizer.batch_size 64 will not fit a 80 GB GPU" in err
    assert "activation_checkpointing: true" in err


def test_check_config_of_the_demo_skips_the_gpu_check(tmp_path, capsys):
    from bh_models.cli import main

    # The demo's config as shipped; its BIDS roots (written by `bh demo`, absent from a clean
    # checkout) become zero-byte layouts here: this test is about the training report only.
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    for name, entry in raw["datasets"].items():
        entry["bids_root"] = str(write_bids(tmp_path / name, {"01": {}, "02": {}}))
    check_config(raw)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "1 CPU process" in out and "GPU memory: not checked" in out
