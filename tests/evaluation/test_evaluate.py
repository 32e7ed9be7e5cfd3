"""End-to-end tests of bh_models.evaluation.evaluate.evaluate_dataset on a small synthetic cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bh_models.core.errors import BHConfigError
from bh_models.evaluation.evaluate import evaluate_dataset

N_SUBJECTS = 20
TASKS = {
    "diagnosis": {"column": "diagnosis", "type": "classification", "positive": "patient"},
    "score": {"column": "score", "type": "regression", "covariates": ["age", "sex"]},
}
SETTINGS = {"n_folds": 5, "n_repeats": 2, "n_permutations": 40, "seed": 0}


def _cohort(root, *, shuffled: bool = False):
    """20 usable subjects whose embeddings carry diagnosis and score, plus 3 unusable ones."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    labels = [f"{i:02d}" for i in range(1, N_SUBJECTS + 4)]
    patient = np.array([1, 0] * (len(labels) // 2) + [1])[: len(labels)]
    score = rng.normal(size=len(labels))
    participants = pd.DataFrame({
        "participant_id": ["sub-" + s for s in labels],
        "diagnosis": np.where(patient == 1, "patient", "control"),
        "score": [f"{v:.4f}" for v in score],
        "age": rng.integers(20, 70, size=len(labels)).astype(str),
        "sex": rng.choice(["F", "M"], size=len(labels)),
    })
    participants.loc[20, "diagnosis"] = "n/a"  # sub-21: missing diagnosis
    participants.loc[21, "score"] = "unknown"  # sub-22: invalid score
    if shuffled:
        # Reassigned diagnoses (1,1,0,0,... against the features' 1,0,1,0,...): a shuffle
        # that agrees with the real diagnosis for exactly half the subjects.
        keep = participants["diagnosis"] != "n/a"
        participants.loc[keep, "diagnosis"] = np.where(np.arange(keep.sum()) % 4 < 2, "patient",
                                                       "control")
    participants.to_csv(root / "participants.tsv", sep="\t", index=False)

    def embeddings(name, n_features, strength, rows_per_subject=1):
        direction = rng.normal(size=(2, n_features))
        effect = np.column_stack([2.0 * patient - 1.0, score])  # (subjects, 2)
        frames = []
        for _ in range(rows_per_subject):
            values = rng.normal(size=(len(labels), n_features)) + strength * effect @ direction
            frame = pd.DataFrame(values, columns=[f"hub_{j:03d}" for j in range(n_features)])
            frame.insert(0, "subject", ["sub-" + s for s in labels])
            frame.insert(0, "dataset", "demo")
            frames.append(frame)
        pd.concat(frames).to_csv(root / f"{name}.tsv", sep="\t", index=False)

    embeddings("fused", 768, 0.3, rows_per_subject=2)  # two TR variants per subject
    embeddings("fmri", 16, 0.3)
    embeddings("t1", 16, 0.0)
    series_dir = root / "timeseries"
    series_dir.mkdir(exist_ok=True)
    for label in labels[:-1]:  # sub-23 has no functional data
        for run in (1, 2):
            frame = pd.DataFrame(rng.normal(size=(30, 12)), columns=[f"roi_{j}" for j in range(12)])
            frame.to_csv(series_dir / f"sub-{label}_task-rest_run-{run}_timeseries.tsv", sep="\t",
                         index=False)
    return root


def _run(root, out, *, timeseries=True, tasks=TASKS):
    paths = {name: out / name for name in ("results.tsv", "predictions.tsv", "metrics.png",
                                           "roc.png", "scatter.png")}
    summary = evaluate_dataset(
        fused=root / "fused.tsv", fmri_only=root / "fmri.tsv", t1_only=root / "t1.tsv",
        timeseries=sorted((root / "timeseries").glob("*.tsv")) if timeseries else [],
        participants=root / "participants.tsv", out_results=paths["results.tsv"],
        out_predictions=paths["predictions.tsv"], out_figure_metrics=paths["metrics.png"],
        out_figure_roc=paths["roc.png"], out_figure_scatter=paths["scatter.png"],
        dataset="demo", tasks=tasks, **SETTINGS)
    return summary, paths


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = _cohort(tmp_path_factory.mktemp("cohort"))
    out = tmp_path_factory.mktemp("out")
    summary, paths = _run(root, out)
    return root, summary, paths, pd.read_csv(paths["results.tsv"], sep="\t")


def test_results_table_has_every_model_and_task(evaluated):
    _, summary, _, results = evaluated
    assert list(results["task"].unique()) == ["diagnosis", "score"]
    assert list(results["model"].unique()) == ["fused", "fmri_only", "t1_only", "fc", "chance"]
    assert len(results) == 10
    classification = results[results["task"] == "diagnosis"]
    assert classification[["auroc_mean", "auroc_sd", "balanced_accuracy_mean", "f1_mean",
                           "f1_weighted_mean", "accuracy_mean"]].notna().all().all()
    assert classification["pearson_r_mean"].isna().all()
    regression = results[results["task"] == "score"]
    assert regression[["pearson_r_mean", "mae_mean"]].notna().all().all()
    assert summary["tasks"]["diagnosis"]["primary_metric"] == "auroc"


def test_probe_size_is_reported(evaluated):
    results = evaluated[3].set_index(["task", "model"])
    assert results.loc[("diagnosis", "fused"), "n_trainable_params"] == 1538  # 768 x 2 + 2
    assert results.loc[("diagnosis", "fc"), "n_features"] == 66  # 12 parcels: 12 * 11 / 2
    assert results.loc[("score", "fused"), "n_trainable_params"] == 769


def test_exclusions_are_counted_per_task(evaluated):
    _, summary, paths, results = evaluated
    rows = results.set_index(["task", "model"])
    assert rows.loc[("diagnosis", "fused"), "n_excluded_missing_target"] == 1  # sub-21
    assert rows.loc[("diagnosis", "fused"), "n_excluded_missing_features"] == 1  # sub-23
    assert rows.loc[("diagnosis", "fused"), "n_subjects"] == 21  # sub-22 only misses its score
    assert rows.loc[("score", "fused"), "n_excluded_invalid_target"] == 1  # sub-22
    assert rows.loc[("score", "fused"), "n_subjects"] == 21
    sidecar = json.loads(paths["results.tsv"].with_suffix(".json").read_text())
    assert sidecar["Tasks"]["score"]["Excluded"]["invalid_target"] == ["sub-22"]
    assert summary["tasks"]["diagnosis"]["excluded"]["missing_features"] == 1


def test_fused_probe_beats_chance(evaluated):
    rows = evaluated[3].set_index(["task", "model"])
    assert rows.loc[("diagnosis", "fused"), "permutation_p"] < 0.05
    assert rows.loc[("diagnosis", "fused"), "auroc_mean"] > 0.8
    assert rows.loc[("score", "fused"), "permutation_p"] < 0.05
    assert rows.loc[("diagnosis", "chance"), "permutation_p"] == 1.0
    assert rows.loc[("diagnosis", "chance"), "auroc_mean"] == 0.5


def test_predictions_cover_every_subject_and_repeat(evaluated):
    predictions = pd.read_csv(evaluated[2]["predictions.tsv"], sep="\t")
    fused = predictions[(predictions["task"] == "diagnosis") & (predictions["model"] == "fused")]
    assert len(fused) == 2 * 21 and fused["score"].between(0, 1).all()
    assert set(fused["subject"]) == {f"sub-{i:02d}" for i in range(1, 23) if i != 21}


def test_figures_are_pngs(evaluated):
    for name in ("metrics.png", "roc.png", "scatter.png"):
        assert evaluated[2][name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_are_byte_identical_on_rerun(evaluated, tmp_path):
    root, _, first, _ = evaluated
    _, second = _run(root, tmp_path)
    for name, path in first.items():
        assert path.read_bytes() == second[name].read_bytes(), name
    assert first["results.tsv"].with_suffix(".json").read_bytes() == \
        second["results.tsv"].with_suffix(".json").read_bytes()


def test_shuffled_diagnosis_is_not_significant(tmp_path):
    root = _cohort(tmp_path / "cohort", shuffled=True)
    _, paths = _run(root, tmp_path / "out", timeseries=False, tasks={"diagnosis": TASKS["diagnosis"]})
    results = pd.read_csv(paths["results.tsv"], sep="\t").set_index("model")
    assert "fc" not in results.index
    assert results.loc["fused", "permutation_p"] > 0.05


def test_unknown_class_weight_is_a_config_error(tmp_path):
    with pytest.raises(BHConfigError, match="class_weight"):
        evaluate_dataset(fused=tmp_path, fmri_only=tmp_path, t1_only=tmp_path, timeseries=[],
                         participants=tmp_path, out_results=tmp_path / "r.tsv",
                         out_predictions=tmp_path / "p.tsv", out_figure_metrics=tmp_path / "m.png",
                         out_figure_roc=tmp_path / "roc.png", out_figure_scatter=tmp_path / "s.png",
                         dataset="demo", tasks=TASKS, class_weight="auto")


def _two_sites(root):
    """The synthetic cohort as two datasets, siteB's embeddings shifted by a large site offset."""
    cohort = _cohort(root / "cohort")
    datasets = {}
    for site, offset in (("siteA", 0.0), ("siteB", 5.0)):
        folder = root / site
        (folder / "timeseries").mkdir(parents=True)
        (folder / "participants.tsv").write_bytes((cohort / "participants.tsv").read_bytes())
        for path in sorted((cohort / "timeseries").glob("*.tsv")):
            (folder / "timeseries" / path.name).write_bytes(path.read_bytes())
        datasets[site] = folder
    for name in ("fused", "fmri", "t1"):
        table = pd.read_csv(cohort / f"{name}.tsv", sep="\t", dtype={"subject": str})
        features = table.columns[2:]
        sites = []
        for site, offset in (("siteA", 0.0), ("siteB", 5.0)):
            shifted = table.copy()
            shifted["dataset"] = site
            shifted[features] = shifted[features] + offset
            sites.append(shifted)
        pd.concat(sites).to_csv(root / f"{name}.tsv", sep="\t", index=False)
    return datasets


def test_pooled_evaluation_regresses_out_the_dataset(tmp_path):
    from bh_models.evaluation.evaluate import evaluate_pooled
    datasets = _two_sites(tmp_path)
    runs = {site: sorted((folder / "timeseries").glob("*.tsv")) for site, folder in datasets.items()}
    out = {name: tmp_path / "out" / name for name in ("results.tsv", "predictions.tsv", "metrics.png",
                                                       "roc.png", "scatter.png")}
    other_score = {**TASKS["score"], "covariates": ["age"]}  # configured differently at siteB: not pooled
    evaluate_pooled(
        fused=[tmp_path / "fused.tsv"] * 2, fmri_only=[tmp_path / "fmri.tsv"] * 2, t1_only=[tmp_path / "t1.tsv"] * 2,
        timeseries=runs["siteA"] + runs["siteB"],
        timeseries_datasets=["siteA"] * len(runs["siteA"]) + ["siteB"] * len(runs["siteB"]),
        participants=[datasets["siteA"] / "participants.tsv", datasets["siteB"] / "participants.tsv"],
        datasets=["siteA", "siteB"], tasks={"siteA": TASKS, "siteB": {**TASKS, "score": other_score}},
        out_results=out["results.tsv"], out_predictions=out["predictions.tsv"],
        out_figure_metrics=out["metrics.png"], out_figure_roc=out["roc.png"],
        out_figure_scatter=out["scatter.png"], **SETTINGS)
    results = pd.read_csv(out["results.tsv"], sep="\t").set_index(["task", "model"])
    assert set(results.index.get_level_values("task")) == {"diagnosis"}
    fused = results.loc[("diagnosis", "fused")]
    assert fused["dataset"] == "pooled" and fused["covariates"] == "dataset"
    assert fused["n_subjects"] == 2 * 21 and fused["permutation_p"] < 0.05
    predictions = pd.read_csv(out["predictions.tsv"], sep="\t")
    assert {"siteA/sub-01", "siteB/sub-01"} <= set(predictions["subject"])


def test_pooled_evaluation_needs_a_shared_task(tmp_path):
    from bh_models.evaluation.evaluate import evaluate_pooled
    datasets = _two_sites(tmp_path)
    other = {"diagnosis": {**TASKS["diagnosis"], "positive": "control"}}
    with pytest.raises(BHConfigError, match="evaluate.pooled.*no task is configured identically"):
        evaluate_pooled(
            fused=[tmp_path / "fused.tsv"] * 2, fmri_only=[tmp_path / "fmri.tsv"] * 2,
            t1_only=[tmp_path / "t1.tsv"] * 2, timeseries=[], timeseries_datasets=[],
            participants=[datasets["siteA"] / "participants.tsv", datasets["siteB"] / "participants.tsv"],
            datasets=["siteA", "siteB"], tasks={"siteA": {"diagnosis": TASKS["diagnosis"]}, "siteB": other},
            out_results=tmp_path / "r.tsv", out_predictions=tmp_path / "p.tsv",
            out_figure_metrics=tmp_path / "m.png", out_figure_roc=tmp_path / "roc.png",
            out_figure_scatter=tmp_path / "s.png", **SETTINGS)
