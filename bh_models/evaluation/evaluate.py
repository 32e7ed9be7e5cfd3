"""Downstream evaluation of one dataset: every model, every task, the same folds.

Step function :func:`evaluate_dataset` reads the three embedding tables (fused hub
tokens, fMRI-only, T1-only), the cleaned parcel time series (for the functional
connectivity baseline) and participants.tsv, and for every configured task

1. codes the target, excluding (and counting) subjects with a missing or invalid
   value, a missing covariate, or no features in one of the tables;
2. draws one set of repeated stratified folds over subjects and one set of label
   permutations (within the first repeat's folds), shared by all models of the task;
3. runs the nested-CV linear probe (and the chance model) on every repeat for the
   observed labels, and on the first repeat for every permutation in one batch;
4. summarises each metric as mean +- sd over repeats, with the permutation p-value
   of the primary metric (AUROC or Pearson r) of the first repeat.

Outputs: **one results TSV per dataset with a ``task`` column** (one row per task and
model), so the rule's outputs do not depend on how many tasks a dataset has and the
report shows one table per dataset; a long TSV of out-of-fold predictions (for
audit and re-plotting); three PNG figures (metric bars with error bars, ROC
curves, regression scatter plots), each with one panel per task.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from bh_models.evaluation.baselines import (
    FeatureTable,
    chance_cross_validated_scores,
    fc_feature_table,
    read_embedding_table,
)
from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.finetuneformat import read_predictions, write_folds
from bh_models.core.jsonio import atomic_write_text, read_json, sidecar_path, write_json
from bh_models.evaluation.finetune import finetuned_scores, folds_table
from bh_models.evaluation.permutation import PermutationResult, observed_and_permuted
from bh_models.evaluation.probe import (
    CLASSIFICATION_METRICS,
    DEFAULT_ALPHA_GRID,
    DEFAULT_C_GRID,
    PRIMARY_METRIC,
    REGRESSION_METRICS,
    ProbeResult,
    Split,
    cross_validated_scores,
    derived_seed,
    make_splits,
    mean_sd,
    metrics_by_repeat,
    probe_parameter_count,
)
from bh_models.evaluation.targets import TaskSpec, build_task_target, parse_tasks, read_participants

__desc__ = (
    "Each downstream task was evaluated on the same folds for the fused hub-token embeddings, "
    "the fMRI-only and T1-only embeddings, a functional-connectivity baseline and a chance "
    "model ({n_folds}-fold cross-validation repeated {n_repeats} times); metrics are reported as "
    "mean +- sd over repeats, with p-values from {n_permutations} label permutations."
)

MODEL_LABELS = {
    "fused": "Fused hub tokens",
    "fused_finetuned": "Fused, fine-tuned",
    "fmri_only": "fMRI only (harmonix-F)",
    "t1_only": "T1 only (harmonix-S)",
    "fc": "FC (Schaefer-400)",
    "chance": "Chance",
}
METRIC_LABELS = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "f1": "F1",
                 "f1_weighted": "F1 (weighted)", "auroc": "AUROC", "pearson_r": "Pearson r",
                 "mae": "MAE"}
EXCLUSION_REASONS = ("missing_target", "invalid_target", "missing_covariate", "missing_features")
POOLED = "pooled"  # the "dataset" name of the all-datasets evaluation
POOLED_COVARIATE = "dataset"  # participants column the pooled evaluation adds and regresses out
_PERMUTATION_STREAM = 1  # seed sub-stream of the label permutations (folds use others)
_COLORS = {"fused": "#1b9e77", "fused_finetuned": "#66a61e", "fmri_only": "#d95f02", "t1_only": "#7570b3", "fc": "#e7298a",
           "chance": "#999999"}


@dataclass(frozen=True)
class ModelOutcome:
    """Results of one model on one task.

    Attributes
    ----------
    model : str
    n_features, n_parameters : int
    metrics : dict of str to numpy.ndarray, shape (n_repeats,)
        Observed-label metric per repeat.
    permutation : PermutationResult
    scores : numpy.ndarray, shape (n_repeats, n_subjects)
        Out-of-fold scores for the observed labels.
    penalty : str
        Most often selected penalty (``C=0.01``, ``alpha=100``), empty for chance.
    """

    model: str
    n_features: int
    n_parameters: int
    metrics: dict[str, np.ndarray]
    permutation: PermutationResult
    scores: np.ndarray
    penalty: str


@dataclass(frozen=True)
class TaskOutcome:
    """All models of one task, on the task's subjects."""

    spec: TaskSpec
    subjects: np.ndarray
    y: np.ndarray
    excluded: dict[str, list[str]]
    models: list[ModelOutcome]


@dataclass(frozen=True)
class Finetuned:
    """The fine-tuning job's out-of-fold scores (the ``evaluate.finetune`` option).

    Attributes
    ----------
    predictions : pandas.DataFrame
        :func:`bh_models.core.finetuneformat.read_predictions`.
    sidecar : dict
        Its JSON sidecar (recipe, trainable parameters).
    source : Path
        The predictions file, for messages.
    dataset : str or None
        The evaluated dataset (None: pooled labels ``<dataset>/<subject>``).
    """

    predictions: pd.DataFrame
    sidecar: dict
    source: Path
    dataset: str | None


def read_finetuned(*, path: Path | Sequence[Path] | None, dataset: str | None) -> Finetuned | None:
    """The fine-tuned scores of a step's ``finetuned`` input, or None when the option is off."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if not paths:
        return None
    source = Path(paths[0])
    sidecar = sidecar_path(source)
    return Finetuned(predictions=read_predictions(source), sidecar=read_json(sidecar) if sidecar.is_file() else {},
                     source=source, dataset=dataset)


def _finetuned_outcome(*, finetuned: Finetuned, spec: TaskSpec, subjects: np.ndarray, y: np.ndarray,
                       splits: Sequence[Split]) -> ModelOutcome:
    """Fine-tuned Harmonizer on the probe's folds; no permutation test (each would refit everything)."""
    scores = finetuned_scores(predictions=finetuned.predictions, task=spec.name, subjects=subjects, splits=splits,
                              dataset=finetuned.dataset, source=finetuned.source)
    metrics = metrics_by_repeat(labels=y, scores=scores[:, :, None], task_type=spec.type)
    metric = PRIMARY_METRIC[spec.type]
    recipe = finetuned.sidecar.get("Recipe", {})
    described = (f"recipe: lr={recipe['lr']:g} layer decay={recipe['layer_decay']:g} epochs={recipe['epochs']}"
                 if recipe else "")
    return ModelOutcome(
        model="fused_finetuned", n_features=0, n_parameters=int(finetuned.sidecar.get("TrainableParameters", 0)),
        metrics={k: v[:, 0] for k, v in metrics.items()},
        permutation=PermutationResult(metric=metric, observed=float(metrics[metric][0, 0]), p_value=float("nan"),
                                      null_mean=float("nan"), null_sd=float("nan"), n_permutations=0),
        scores=scores, penalty=described)


def _dataset_inputs(*, fused: Path, fmri_only: Path, t1_only: Path, timeseries: Sequence[Path], participants: Path,
                    dataset: str, tasks: Mapping[str, Mapping]) -> tuple[list[TaskSpec], pd.DataFrame,
                                                                          list[FeatureTable]]:
    """Tasks, participants table and feature tables of one dataset's evaluation."""
    specs = parse_tasks(tasks=tasks, config_key=f"datasets.{dataset}.targets")
    table = read_participants(path=Path(participants))
    feature_tables = [read_embedding_table(path=Path(fused), name="fused", dataset=dataset),
                      read_embedding_table(path=Path(fmri_only), name="fmri_only", dataset=dataset),
                      read_embedding_table(path=Path(t1_only), name="t1_only", dataset=dataset)]
    if timeseries:
        feature_tables.append(fc_feature_table(timeseries=[Path(p) for p in timeseries],
                                               subjects=table.index))
    return specs, table, feature_tables


def write_finetune_folds(*, fused: Path, fmri_only: Path, t1_only: Path, timeseries: Sequence[Path],
                         participants: Path, out_folds: Path, dataset: str, tasks: Mapping[str, Mapping],
                         n_folds: int = 5, n_repeats: int = 10, seed: int = 0, threads: int = 1) -> dict:
    """Step function: the folds the fine-tuning job trains on, the probes' own, for one dataset.

    The inputs are :func:`evaluate_dataset`'s, so every task has the same subjects
    (exclusions included) and the same folds as the probes.

    Parameters
    ----------
    fused, fmri_only, t1_only, timeseries, participants, dataset, tasks, n_folds, n_repeats, seed
        As for :func:`evaluate_dataset`.
    out_folds : Path
        Folds table (:func:`bh_models.core.finetuneformat.write_folds`).
    threads : int
        Unused (the rule's contract); the folds cost nothing.

    Returns
    -------
    dict
        Subjects per task.
    """
    specs, table, feature_tables = _dataset_inputs(fused=fused, fmri_only=fmri_only, t1_only=t1_only,
                                                   timeseries=timeseries, participants=participants,
                                                   dataset=dataset, tasks=tasks)
    return _write_folds(specs=specs, participants=table, participants_path=Path(participants),
                        feature_tables=feature_tables, n_folds=n_folds, n_repeats=n_repeats, seed=seed,
                        dataset=dataset, out_folds=Path(out_folds))


def _write_folds(*, specs: Sequence[TaskSpec], participants: pd.DataFrame, participants_path: Path | str,
                 feature_tables: Sequence[FeatureTable], n_folds: int, n_repeats: int, seed: int,
                 dataset: str | None, out_folds: Path) -> dict:
    frames, counts = [], {}
    for spec in specs:
        target, _ = _task_target(spec=spec, participants=participants, participants_path=participants_path,
                                 feature_tables=feature_tables)
        splits = make_splits(y=target.y, task_type=spec.type, n_folds=n_folds, n_repeats=n_repeats, seed=seed)
        frames.append(folds_table(task=spec.name, task_type=spec.type, subjects=target.subjects, y=target.y,
                                  splits=splits, dataset=dataset))
        counts[spec.name] = int(len(target.subjects))
    write_folds(pd.concat(frames, ignore_index=True), out_folds)
    return {"subjects": counts}


def evaluate_dataset(*, fused: Path, fmri_only: Path, t1_only: Path, timeseries: Sequence[Path],
                     participants: Path, out_results: Path, out_predictions: Path,
                     out_figure_metrics: Path, out_figure_roc: Path, out_figure_scatter: Path,
                     dataset: str, tasks: Mapping[str, Mapping], n_folds: int = 5,
                     n_repeats: int = 10, n_permutations: int = 200,
                     logistic_c_grid: Sequence[float] = DEFAULT_C_GRID,
                     ridge_alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
                     class_weight: str | None = "balanced", seed: int = 0,
                     finetuned: Path | Sequence[Path] | None = None,
                     finetune: Mapping | None = None, threads: int = 1) -> dict:
    """Linear probes, baselines and permutation tests for every task of one dataset.

    Parameters
    ----------
    fused, fmri_only, t1_only : Path
        Embedding TSVs (``dataset, subject, features...``); rows of other datasets
        are ignored, several rows per subject are kept together.
    timeseries : sequence of Path
        Cleaned parcel time-series TSVs of this dataset for the FC baseline (empty:
        no FC row).
    participants : Path
        The raw dataset's participants.tsv.
    out_results : Path
        Results TSV, one row per task and model (+ JSON sidecar with exclusions).
    out_predictions : Path
        Out-of-fold predictions TSV: task, model, repeat, subject, y_true, score.
    out_figure_metrics, out_figure_roc, out_figure_scatter : Path
        PNG figures: metric bars (mean +- sd), mean ROC curves, predicted vs true.
    dataset : str
        Dataset name (config key).
    tasks : mapping
        The dataset's ``tasks`` config (see :mod:`bh_models.evaluation.targets`).
    n_folds, n_repeats : int
        Outer folds (the penalty is tuned on the other k-1 folds) and repeats.
    n_permutations : int
        Label permutations for the p-values, on the first repeat's folds (0: no test).
    logistic_c_grid, ridge_alpha_grid : sequence of float
        Penalty grids of the logistic and ridge probes.
    class_weight : {"balanced", None}
        Class weighting of the logistic probe.
    seed : int
        Seed of the folds and permutations.
    finetuned : Path, optional
        Out-of-fold scores of the fine-tuning job (rule ``finetune``,
        :mod:`bh_models.models.finetune`) on this step's folds (rule ``finetune_folds``):
        a ``fused_finetuned`` row is added (no covariates, no permutation test).
    finetune : mapping, optional
        ``evaluate.finetune`` config, recorded in the sidecar.
    threads : int
        BLAS threads.

    Returns
    -------
    dict
        Per task: subject count, exclusions and each model's primary metric and p.
    """
    if n_repeats < 1 or n_permutations < 0:
        raise BHConfigError("evaluate.n_repeats",
                            "n_repeats must be >= 1 and n_permutations >= 0",
                            "set n_repeats to at least 1 and n_permutations to at least 0")
    if class_weight not in ("balanced", None):
        raise BHConfigError("evaluate.class_weight", f"{class_weight!r} is not supported",
                            "use 'balanced' or null")
    specs, table, feature_tables = _dataset_inputs(fused=fused, fmri_only=fmri_only, t1_only=t1_only,
                                                   timeseries=timeseries, participants=participants,
                                                   dataset=dataset, tasks=tasks)
    settings = {"n_folds": n_folds, "n_repeats": n_repeats, "n_permutations": n_permutations,
                "logistic_c_grid": list(logistic_c_grid),
                "ridge_alpha_grid": list(ridge_alpha_grid), "class_weight": class_weight,
                "seed": seed, "finetune": dict(finetune or {}),
                "feature_notes": {t.name: t.notes for t in feature_tables if t.notes}}
    outcomes = _evaluate_tasks(specs=specs, participants=table, participants_path=Path(participants),
                               feature_tables=feature_tables, settings=settings,
                               finetuned=read_finetuned(path=finetuned, dataset=dataset), threads=threads)
    return _write_outputs(dataset=dataset, outcomes=outcomes, settings=settings, out_results=Path(out_results),
                          out_predictions=Path(out_predictions), out_figure_metrics=Path(out_figure_metrics),
                          out_figure_roc=Path(out_figure_roc), out_figure_scatter=Path(out_figure_scatter))


def _pooled_inputs(*, fused: Sequence[Path], fmri_only: Sequence[Path], t1_only: Sequence[Path],
                   timeseries: Sequence[Path], timeseries_datasets: Sequence[str], participants: Sequence[Path],
                   datasets: Sequence[str], tasks: Mapping[str, Mapping[str, Mapping]]
                   ) -> tuple[list[TaskSpec], pd.DataFrame, list[FeatureTable], dict[str, list]]:
    """Pooled tasks, the combined participants table, the concatenated feature tables and each
    model's per-dataset feature notes (constant parcels counted by the FC baseline)."""
    if len(participants) != len(datasets) or len(timeseries) != len(timeseries_datasets) \
            or not len(fused) == len(fmri_only) == len(t1_only) == len(datasets):
        raise ValueError("participants, embeddings and datasets, and timeseries/timeseries_datasets must align")
    specs = pooled_tasks(tasks={name: parse_tasks(tasks=tasks[name], config_key=f"datasets.{name}.targets")
                                for name in datasets})
    if not specs:
        raise BHConfigError("evaluate.pooled", "no task is configured identically in every dataset",
                            "give the datasets a shared task (same column, type and classes) or set "
                            "evaluate.pooled: false")
    embeddings = {"fused": list(fused), "fmri_only": list(fmri_only), "t1_only": list(t1_only)}
    tables, parts = [], {name: [] for name in (*embeddings, "fc")}
    for position, (name, path) in enumerate(zip(datasets, participants)):
        table = read_participants(path=Path(path))
        if POOLED_COVARIATE in table.columns:
            raise BHInputError(path, f"has a '{POOLED_COVARIATE}' column, which pooled evaluation adds",
                               "rename that column, or set evaluate.pooled: false")
        for model, paths in embeddings.items():
            parts[model].append(_relabelled(read_embedding_table(path=Path(paths[position]), name=model, dataset=name),
                                            dataset=name))
        runs = [Path(p) for p, d in zip(timeseries, timeseries_datasets) if d == name]
        if runs:
            parts["fc"].append(_relabelled(fc_feature_table(timeseries=runs, subjects=table.index), dataset=name))
        tables.append(table.assign(**{POOLED_COVARIATE: name})
                      .set_axis([_pooled_label(name, s) for s in table.index], axis=0))
    combined = pd.concat(tables)
    # FC only when every dataset has time series: a model must cover the same subjects.
    feature_tables = [_concatenated(parts[m]) for m in parts if len(parts[m]) == len(datasets)]
    notes = {m: [t.notes for t in parts[m] if t.notes] for m in parts if any(t.notes for t in parts[m])}
    return specs, combined, feature_tables, notes


def evaluate_pooled(*, fused: Sequence[Path], fmri_only: Sequence[Path], t1_only: Sequence[Path],
                    timeseries: Sequence[Path],
                    timeseries_datasets: Sequence[str], participants: Sequence[Path],
                    datasets: Sequence[str], tasks: Mapping[str, Mapping[str, Mapping]],
                    out_results: Path, out_predictions: Path, out_figure_metrics: Path,
                    out_figure_roc: Path, out_figure_scatter: Path, n_folds: int = 5,
                    n_repeats: int = 10, n_permutations: int = 200,
                    logistic_c_grid: Sequence[float] = DEFAULT_C_GRID,
                    ridge_alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
                    class_weight: str | None = "balanced", seed: int = 0,
                    finetuned: Path | Sequence[Path] | None = None,
                    finetune: Mapping | None = None, threads: int = 1) -> dict:
    """Step function: the same evaluation on every dataset's subjects together.

    Small sites cannot support cross-validated inference alone (8 subjects leave
    5 to train on), so the subjects of all datasets are also evaluated together.
    A task is pooled when every dataset configures it identically (column, type,
    classes, covariates); ``dataset`` is added to its covariates, so site offsets
    are regressed out of the features inside each training fold. Subjects are
    labelled ``<dataset>/sub-<label>`` in the outputs.

    Parameters
    ----------
    fused, fmri_only, t1_only : sequence of Path
        Embedding TSVs of each dataset, in the order of ``datasets``.
    timeseries : sequence of Path
        Cleaned parcel time series of all datasets (FC baseline) ...
    timeseries_datasets : sequence of str
        ... and the dataset of each.
    participants : sequence of Path
        participants.tsv of each dataset, in the order of ``datasets``.
    datasets : sequence of str
        Dataset names (config keys).
    tasks : mapping
        Dataset name -> its ``targets`` config.
    finetuned : Path, optional
        Out-of-fold scores of the pooled fine-tuning job (rule ``finetune_pooled``).
    Other parameters and outputs as in :func:`evaluate_dataset` (``dataset`` = ``pooled``).
    """
    specs, combined, feature_tables, notes = _pooled_inputs(
        fused=fused, fmri_only=fmri_only, t1_only=t1_only, timeseries=timeseries,
        timeseries_datasets=timeseries_datasets, participants=participants, datasets=datasets, tasks=tasks)
    settings = {"n_folds": n_folds, "n_repeats": n_repeats, "n_permutations": n_permutations,
                "logistic_c_grid": list(logistic_c_grid), "ridge_alpha_grid": list(ridge_alpha_grid),
                "class_weight": class_weight, "seed": seed, "datasets": list(datasets),
                "finetune": dict(finetune or {}),
                "feature_notes": notes}
    outcomes = _evaluate_tasks(specs=specs, participants=combined,
                               participants_path=" + ".join(map(str, participants)),
                               feature_tables=feature_tables, settings=settings,
                               finetuned=read_finetuned(path=finetuned, dataset=None), threads=threads)
    return _write_outputs(dataset=POOLED, outcomes=outcomes, settings=settings, out_results=Path(out_results),
                          out_predictions=Path(out_predictions), out_figure_metrics=Path(out_figure_metrics),
                          out_figure_roc=Path(out_figure_roc), out_figure_scatter=Path(out_figure_scatter))


def write_finetune_folds_pooled(*, fused: Sequence[Path], fmri_only: Sequence[Path], t1_only: Sequence[Path],
                                timeseries: Sequence[Path], timeseries_datasets: Sequence[str],
                                participants: Sequence[Path], datasets: Sequence[str],
                                tasks: Mapping[str, Mapping[str, Mapping]], out_folds: Path, n_folds: int = 5,
                                n_repeats: int = 10, seed: int = 0, threads: int = 1) -> dict:
    """Step function: :func:`write_finetune_folds` of the pooled evaluation (inputs of :func:`evaluate_pooled`)."""
    specs, combined, feature_tables, _ = _pooled_inputs(
        fused=fused, fmri_only=fmri_only, t1_only=t1_only, timeseries=timeseries,
        timeseries_datasets=timeseries_datasets, participants=participants, datasets=datasets, tasks=tasks)
    return _write_folds(specs=specs, participants=combined, participants_path=" + ".join(map(str, participants)),
                        feature_tables=feature_tables, n_folds=n_folds, n_repeats=n_repeats, seed=seed,
                        dataset=None, out_folds=Path(out_folds))


def _evaluate_tasks(*, specs: Sequence[TaskSpec], participants: pd.DataFrame, participants_path: Path | str,
                    feature_tables: Sequence[FeatureTable], settings: Mapping, finetuned: Finetuned | None,
                    threads: int) -> list[TaskOutcome]:
    """:func:`evaluate_task` for every task, with the step's settings (folds, grids, seed)."""
    return [
        evaluate_task(spec=spec, participants=participants, participants_path=participants_path,
                      feature_tables=feature_tables, n_folds=settings["n_folds"], n_repeats=settings["n_repeats"],
                      n_permutations=settings["n_permutations"],
                      penalty_grid=settings["logistic_c_grid" if spec.type == "classification" else "ridge_alpha_grid"],
                      class_weight=settings["class_weight"], seed=settings["seed"], threads=threads,
                      finetuned=finetuned)
        for spec in specs
    ]


def pooled_tasks(*, tasks: Mapping[str, Sequence[TaskSpec]]) -> list[TaskSpec]:
    """Tasks configured identically in every dataset, with ``dataset`` added to the covariates.

    Parameters
    ----------
    tasks : mapping
        Dataset name -> its parsed tasks.

    Returns
    -------
    list of TaskSpec
        In the first dataset's order; tasks missing or configured differently
        anywhere are left out (they are still evaluated per dataset).
    """
    names = list(tasks)
    pooled = []
    for spec in tasks[names[0]]:
        same = all(any(other == spec for other in tasks[name]) for name in names[1:])
        if same:
            pooled.append(dataclasses.replace(spec, covariates=(*spec.covariates, POOLED_COVARIATE)))
    return pooled


def _pooled_label(dataset: str, subject: str) -> str:
    return f"{dataset}/{subject}"


def _relabelled(table: FeatureTable, *, dataset: str) -> FeatureTable:
    return dataclasses.replace(table, subjects=np.array([_pooled_label(dataset, s) for s in table.subjects]))


def _concatenated(parts: Sequence[FeatureTable]) -> FeatureTable:
    return FeatureTable(name=parts[0].name, subjects=np.concatenate([p.subjects for p in parts]),
                        values=np.vstack([p.values for p in parts]), source=", ".join(p.source for p in parts))


def bids_subject(label: str) -> str:
    """``01`` -> ``sub-01``; a pooled ``siteA/01`` -> ``siteA/sub-01``."""
    dataset, _, subject = label.rpartition("/")
    return f"{dataset}/sub-{subject}" if dataset else f"sub-{subject}"


def _write_outputs(*, dataset: str, outcomes: Sequence[TaskOutcome], settings: Mapping, out_results: Path,
                   out_predictions: Path, out_figure_metrics: Path, out_figure_roc: Path,
                   out_figure_scatter: Path) -> dict:
    """Results TSV + sidecar, predictions TSV, three figures; returns the step summary."""
    _write_tsv(results_table(dataset=dataset, outcomes=outcomes, settings=settings), out_results)
    write_json(sidecar_path(out_results), _results_sidecar(dataset=dataset, outcomes=outcomes,
                                                           settings=settings))
    _write_tsv(predictions_table(outcomes=outcomes), out_predictions)
    _save_figure(plot_metrics(outcomes=outcomes, dataset=dataset), out_figure_metrics)
    _save_figure(plot_roc(outcomes=outcomes, dataset=dataset), out_figure_roc)
    _save_figure(plot_scatter(outcomes=outcomes, dataset=dataset), out_figure_scatter)
    return {
        "dataset": dataset,
        "tasks": {
            o.spec.name: {
                "n_subjects": int(len(o.subjects)),
                "excluded": {reason: len(labels) for reason, labels in o.excluded.items()},
                "primary_metric": PRIMARY_METRIC[o.spec.type],
                "models": {m.model: {"mean": float(m.metrics[PRIMARY_METRIC[o.spec.type]].mean()),
                                     "p_value": m.permutation.p_value} for m in o.models},
            }
            for o in outcomes
        },
    }


def _task_target(*, spec: TaskSpec, participants: pd.DataFrame, participants_path: Path | str,
                 feature_tables: Sequence[FeatureTable]):
    """The task's coded target over the subjects every feature table covers, and the exclusions."""
    target = build_task_target(participants=participants, task=spec, source=participants_path)
    has_features = np.ones(len(target.subjects), dtype=bool)
    for features in feature_tables:
        has_features &= np.isin(target.subjects, features.subjects)
    excluded = dict(target.excluded)
    excluded["missing_features"] = target.subjects[~has_features].tolist()
    return target.subset(keep=has_features), excluded


def evaluate_task(*, spec: TaskSpec, participants: pd.DataFrame, participants_path: Path | str,
                  feature_tables: Sequence[FeatureTable], n_folds: int, n_repeats: int,
                  n_permutations: int, penalty_grid: Sequence[float],
                  class_weight: str | None, seed: int, threads: int = 1,
                  finetuned: Finetuned | None = None) -> TaskOutcome:
    """Every model plus chance on one task, on shared folds and permutations.

    Parameters
    ----------
    spec : TaskSpec
    participants : pandas.DataFrame
        From :func:`bh_models.evaluation.targets.read_participants`.
    participants_path : Path
        For error messages.
    feature_tables : sequence of FeatureTable
        The models to compare; a subject must be in all of them to be evaluated.
    n_folds, n_repeats, n_permutations : int
    penalty_grid : sequence of float
    class_weight : {"balanced", None}
    seed : int
    threads : int
    finetuned : Finetuned, optional
        Adds the fine-tuned model, scored by the fine-tuning job on these folds.

    Returns
    -------
    TaskOutcome
    """
    target, excluded = _task_target(spec=spec, participants=participants, participants_path=participants_path,
                                    feature_tables=feature_tables)
    splits = make_splits(y=target.y, task_type=spec.type, n_folds=n_folds, n_repeats=n_repeats,
                         seed=seed)
    scorers = {}
    for features in feature_tables:
        x, row_subject = features.rows_for(subjects=target.subjects)
        scorers[features.name] = (features.n_features, _probe_scorer(
            features=x, row_subject=row_subject, task_type=spec.type, covariates=target.covariates,
            penalty_grid=penalty_grid, class_weight=class_weight, threads=threads,
            progress=f"{spec.name}/{features.name}"))
    scorers["chance"] = (0, lambda labels, folds: chance_cross_validated_scores(
        labels=labels, splits=folds, task_type=spec.type, class_weight=class_weight))
    models = []
    for name, (n_features, score) in scorers.items():
        # The first repeat is fitted once, for the observed labels and the permutations together.
        observed, test = observed_and_permuted(score=score, y=target.y, splits=splits, task_type=spec.type,
                                               metric=PRIMARY_METRIC[spec.type], n_permutations=n_permutations,
                                               seed=derived_seed(seed=seed, keys=(_PERMUTATION_STREAM,)))
        metrics = metrics_by_repeat(labels=target.y, scores=observed.scores, task_type=spec.type)
        models.append(ModelOutcome(
            model=name, n_features=n_features,
            n_parameters=probe_parameter_count(n_features=n_features, task_type=spec.type),
            metrics={k: v[:, 0] for k, v in metrics.items()}, permutation=test,
            scores=observed.scores[:, :, 0],
            penalty=_most_selected(values=observed.selected[:, 0],
                                   name="C" if spec.type == "classification" else "alpha")))
    if finetuned is not None:
        models.insert(1, _finetuned_outcome(finetuned=finetuned, spec=spec, subjects=target.subjects, y=target.y,
                                            splits=splits))
    return TaskOutcome(spec=spec, subjects=target.subjects, y=target.y, excluded=excluded,
                       models=models)


def _probe_scorer(*, features: np.ndarray, row_subject: np.ndarray, task_type: str,
                  covariates: np.ndarray | None, penalty_grid: Sequence[float],
                  class_weight: str | None, threads: int, progress: str):
    """``score(labels, splits)`` of one feature table, as the permutation test expects."""
    def score(labels: np.ndarray, splits: Sequence[Split]) -> ProbeResult:
        return cross_validated_scores(
            features=features, row_subject=row_subject, labels=labels, splits=splits,
            task_type=task_type, covariates=covariates, penalty_grid=penalty_grid,
            class_weight=class_weight, progress=progress, threads=threads)
    return score


def _most_selected(*, values: np.ndarray, name: str) -> str:
    """The penalty chosen in most splits; ties go to the stronger penalty (small C, large alpha)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return ""
    strength = -1.0 if name == "C" else 1.0
    counts = Counter(finite.tolist())
    value, count = max(counts.items(), key=lambda item: (item[1], strength * item[0]))
    return f"{name}={value:g} ({count}/{finite.size} splits)"


def results_table(*, dataset: str, outcomes: Sequence[TaskOutcome],
                  settings: Mapping) -> pd.DataFrame:
    """One row per task and model: sizes, exclusions, metric mean/sd, permutation test.

    Parameters
    ----------
    dataset : str
    outcomes : sequence of TaskOutcome
    settings : mapping
        ``n_folds`` and ``n_repeats`` are copied into every row.

    Returns
    -------
    pandas.DataFrame
        Metrics that do not apply to the task type are NaN.
    """
    rows = []
    for outcome in outcomes:
        spec = outcome.spec
        for model in outcome.models:
            row = {
                "dataset": dataset, "task": spec.name, "task_type": spec.type,
                "target_column": spec.column, "positive_class": spec.positive or "",
                "covariates": ",".join(spec.covariates), "model": model.model,
                "n_subjects": len(outcome.subjects),
                "n_positive": int(outcome.y.sum()) if spec.type == "classification" else np.nan,
                "n_features": model.n_features, "n_trainable_params": model.n_parameters,
            }
            row.update({f"n_excluded_{reason}": len(outcome.excluded.get(reason, []))
                        for reason in EXCLUSION_REASONS})
            for metric in (*CLASSIFICATION_METRICS, *REGRESSION_METRICS):
                applies = metric in model.metrics
                mean, sd = mean_sd(values=model.metrics[metric]) if applies else (np.nan, np.nan)
                row[f"{metric}_mean"], row[f"{metric}_sd"] = mean, sd
            test = model.permutation
            row.update({"permutation_metric": test.metric, "permutation_observed": test.observed,
                        "permutation_p": test.p_value,
                        "null_mean": test.null_mean, "null_sd": test.null_sd,
                        "n_permutations": test.n_permutations, "selected_penalty": model.penalty,
                        "n_folds": settings["n_folds"], "n_repeats": settings["n_repeats"]})
            rows.append(row)
    return pd.DataFrame(rows)


def predictions_table(*, outcomes: Sequence[TaskOutcome]) -> pd.DataFrame:
    """Long table of out-of-fold scores: task, model, repeat, subject, y_true, score."""
    frames = []
    for outcome in outcomes:
        for model in outcome.models:
            n_repeats, n_subjects = model.scores.shape
            frames.append(pd.DataFrame({
                "task": outcome.spec.name,
                "model": model.model,
                "repeat": np.repeat(np.arange(n_repeats), n_subjects),
                "subject": np.tile([bids_subject(s) for s in outcome.subjects], n_repeats),
                "y_true": np.tile(outcome.y, n_repeats),
                "score": model.scores.reshape(-1),  # (n_repeats, n_subjects) -> repeat-major
            }))
    return pd.concat(frames, ignore_index=True)


def _results_sidecar(*, dataset: str, outcomes: Sequence[TaskOutcome], settings: Mapping) -> dict:
    return {
        "Description": "Linear-probe evaluation of Brain Harmony embeddings and baselines",
        "Dataset": dataset,
        "Settings": {k: v for k, v in settings.items() if k != "feature_notes"},
        # E.g. the FC pairs set to 0 because a parcel had no signal in a run (baselines.fc_feature_table).
        "FeatureNotes": dict(settings.get("feature_notes", {})),
        "Tasks": {
            o.spec.name: {
                "Column": o.spec.column, "Type": o.spec.type, "Positive": o.spec.positive,
                "Negative": list(o.spec.negative), "Covariates": list(o.spec.covariates),
                "NumberOfSubjects": int(len(o.subjects)),
                "Excluded": {reason: [bids_subject(s) for s in o.excluded.get(reason, [])]
                             for reason in EXCLUSION_REASONS},
            }
            for o in outcomes
        },
        "Columns": {
            "n_trainable_params": "probe parameters, classification counted as a 2-output head "
                                  "(768-d: 768 x 2 + 2 = 1538); regression weights + bias",
            "<metric>_mean/_sd": "mean and sample sd over repeats of the metric computed on "
                                 "each repeat's pooled out-of-fold predictions",
            "permutation_observed": "primary metric of the first repeat, the test statistic",
            "permutation_p": "(1 + #{permuted >= observed}) / (1 + n_permutations); labels "
                             "permuted within the first repeat's outer folds, whole nested CV "
                             "rerun on the same folds",
            "null_mean/null_sd": "mean and sd of the primary metric under permuted labels",
            "selected_penalty": "penalty chosen by the inner CV in most outer splits",
        },
        "Methods": __desc__,
    }


def _write_tsv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, frame.to_csv(sep="\t", index=False, float_format="%.6g",
                                         na_rep="n/a", lineterminator="\n"))


def _save_figure(figure: Figure, path: Path) -> None:
    """Write a PNG atomically, without the version string, so reruns are byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _empty_figure(message: str) -> Figure:
    figure = Figure(figsize=(5, 2))
    figure.text(0.5, 0.5, message, ha="center", va="center")
    return figure


def plot_metrics(*, outcomes: Sequence[TaskOutcome], dataset: str) -> Figure:
    """Bar charts, one row per task and one panel per metric: mean +- sd over repeats.

    The primary metric's panel shows the permutation p-value above each bar and the
    fused model's permutation null (mean +- sd) as a grey band.
    """
    if not outcomes:
        return _empty_figure("no tasks configured")
    n_columns = max(len(CLASSIFICATION_METRICS), len(REGRESSION_METRICS))
    figure = Figure(figsize=(3.2 * n_columns, 3.2 * len(outcomes)), layout="constrained")
    axes = figure.subplots(len(outcomes), n_columns, squeeze=False)
    for row, outcome in zip(axes, outcomes):
        metrics = (CLASSIFICATION_METRICS if outcome.spec.type == "classification"
                   else REGRESSION_METRICS)
        primary = PRIMARY_METRIC[outcome.spec.type]
        names = [m.model for m in outcome.models]
        positions = np.arange(len(names))
        for ax, metric in zip(row, metrics):
            stats = [mean_sd(values=m.metrics[metric]) for m in outcome.models]
            ax.bar(positions, [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3,
                   color=[_COLORS.get(n, "#666666") for n in names])
            ax.set_xticks(positions, [MODEL_LABELS.get(n, n) for n in names], rotation=45,
                          ha="right", fontsize=7)
            ax.set_title(f"{outcome.spec.name}: {METRIC_LABELS[metric]}", fontsize=9)
            if metric == primary:
                null = outcome.models[0].permutation  # the first feature table: fused
                if np.isfinite(null.null_mean):
                    ax.axhspan(null.null_mean - np.nan_to_num(null.null_sd),
                               null.null_mean + np.nan_to_num(null.null_sd), color="0.85", zorder=0)
                for x, model, (mean, sd) in zip(positions, outcome.models, stats):
                    if np.isfinite(model.permutation.p_value) and np.isfinite(mean):
                        ax.annotate(f"p={model.permutation.p_value:.3f}", (x, mean + sd),
                                    ha="center", va="bottom", fontsize=6)
            ax.margins(y=0.15)  # room for the p-values
        for ax in row[len(metrics):]:
            ax.set_visible(False)
    figure.suptitle(f"{dataset}: linear probes (mean ± sd over repeats; grey band: permutation "
                    f"null of the fused probe, mean ± sd; p: permutation test)")
    return figure


def plot_roc(*, outcomes: Sequence[TaskOutcome], dataset: str) -> Figure:
    """Mean ROC curve over repeats (+- sd band) per model, one panel per classification task."""
    tasks = [o for o in outcomes if o.spec.type == "classification"]
    if not tasks:
        return _empty_figure("no classification task configured")
    figure = Figure(figsize=(4.2 * len(tasks), 4.2), layout="constrained")
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    grid = np.linspace(0.0, 1.0, 101)
    for ax, outcome in zip(axes, tasks):
        for model in outcome.models:
            if model.model == "chance":
                continue
            curves = []
            for repeat_scores in model.scores:
                fpr, tpr, _ = roc_curve(outcome.y, repeat_scores)
                curves.append(np.interp(grid, fpr, tpr))
            mean, sd = np.mean(curves, axis=0), np.std(curves, axis=0)
            auc_mean, auc_sd = mean_sd(values=model.metrics["auroc"])
            color = _COLORS.get(model.model, "#666666")
            ax.plot(grid, mean, color=color,
                    label=f"{MODEL_LABELS.get(model.model, model.model)} "
                          f"({auc_mean:.2f} ± {auc_sd:.2f})")
            ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=color,
                            alpha=0.15, linewidth=0)
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", label="Chance")
        ax.set_xlabel("False positive rate")
        ax.set_ylabel("True positive rate")
        ax.set_title(f"{outcome.spec.name} ({outcome.spec.positive} vs rest)", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    figure.suptitle(f"{dataset}: ROC curves (mean ± sd over repeats)")
    return figure


def plot_scatter(*, outcomes: Sequence[TaskOutcome], dataset: str) -> Figure:
    """Predicted (mean over repeats) against true values, one row per regression task."""
    tasks = [o for o in outcomes if o.spec.type == "regression"]
    if not tasks:
        return _empty_figure("no regression task configured")
    models = [m.model for m in tasks[0].models if m.model != "chance"]
    figure = Figure(figsize=(3.4 * len(models), 3.4 * len(tasks)), layout="constrained")
    axes = figure.subplots(len(tasks), len(models), squeeze=False)
    for row, outcome in zip(axes, tasks):
        for ax, model in zip(row, [m for m in outcome.models if m.model != "chance"]):
            predicted = model.scores.mean(axis=0)
            ax.scatter(outcome.y, predicted, s=12, color=_COLORS.get(model.model, "#666666"))
            low = min(outcome.y.min(), predicted.min())
            high = max(outcome.y.max(), predicted.max())
            ax.plot([low, high], [low, high], linestyle="--", color="0.5")
            r_mean, r_sd = mean_sd(values=model.metrics["pearson_r"])
            ax.set_title(f"{outcome.spec.name}: {MODEL_LABELS.get(model.model, model.model)}\n"
                         f"r = {r_mean:.2f} ± {r_sd:.2f}, p = {model.permutation.p_value:.3f}",
                         fontsize=8)
            ax.set_xlabel(f"true {outcome.spec.column}")
            ax.set_ylabel("predicted (mean over repeats)")
    figure.suptitle(f"{dataset}: regression probes")
    return figure
