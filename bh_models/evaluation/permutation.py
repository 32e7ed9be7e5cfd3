"""Label-permutation test of a cross-validated probe against chance, on the same folds.

The null distribution comes from rerunning the *whole* procedure (nested penalty
selection included) on the same folds with permuted subject labels. Labels are
permuted across subjects, so all rows of a subject keep one label.

Exactness. Folds are stratified on the observed labels. Permuting labels freely
would give unstratified folds under the null only, and the null would no longer be
the distribution of the observed statistic. So labels are permuted *within* the
outer folds of the first repeat (exchangeability blocks, Winkler et al. 2014):
every fold, outer or inner (:func:`bh_models.evaluation.probe.make_splits` builds inner folds
from whole outer folds), keeps its label composition, and under the null
hypothesis the permuted and the observed statistics have the same distribution.
The statistic is therefore the first repeat's metric; the mean +- sd over all
repeats is reported separately.

Speed. The probe solvers are batched over label columns, so the observed labels
and all permutations run as one label matrix (column 0 = observed) sharing every
feature-dependent computation; 200 permutations of ~20 subjects take seconds.

p = (1 + #{null >= observed}) / (1 + n_permutations)  (Phipson & Smyth 2010), with
``<=`` for metrics where lower is better (MAE). An undefined null value (NaN)
counts as at least as extreme, which keeps the test conservative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bh_models.evaluation.probe import (
    GREATER_IS_BETTER,
    ProbeResult,
    Split,
    fold_of_subjects,
    metrics_by_repeat,
)

__desc__ = (
    "Significance against chance was assessed with {n_permutations} label permutations within "
    "the outer folds of the first cross-validation repeat (exchangeability blocks, Winkler et "
    "al. 2014), rerunning the complete nested cross-validation on the same folds, with "
    "p = (1 + #{permuted >= observed}) / (1 + number of permutations)."
)


@dataclass(frozen=True)
class PermutationResult:
    """Observed statistic against its permutation null.

    Attributes
    ----------
    metric : str
        The statistic: this metric over the permutation repeat's pooled predictions.
    observed : float
    p_value : float
    null_mean, null_sd : float
        Mean and sd of the finite null values (the empirical chance level).
    n_permutations : int
    """

    metric: str
    observed: float
    p_value: float
    null_mean: float
    null_sd: float
    n_permutations: int


def permuted_labels(*, y: np.ndarray, blocks: np.ndarray, n_permutations: int,
                    seed: int) -> np.ndarray:
    """The observed labels followed by permutations of them within blocks.

    Parameters
    ----------
    y : numpy.ndarray, shape (n_subjects,)
        Subject-level labels.
    blocks : numpy.ndarray of int, shape (n_subjects,)
        Exchangeability block of every subject (the outer fold); labels only move
        between subjects of one block.
    n_permutations : int
    seed : int

    Returns
    -------
    numpy.ndarray, shape (n_subjects, 1 + n_permutations)
        Column 0 is ``y``; every column has the same labels in every block.
    """
    y = np.asarray(y)
    blocks = np.asarray(blocks)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(blocks == b) for b in np.unique(blocks)]
    labels = np.repeat(y[:, None], 1 + n_permutations, axis=1)  # n_subjects x (1 + P)
    for column in range(1, 1 + n_permutations):
        for index in members:
            labels[index, column] = y[rng.permutation(index)]
    return labels


def permutation_p_value(*, observed: float, null: np.ndarray,
                        greater_is_better: bool = True) -> float:
    """p = (1 + #{null at least as good as observed}) / (1 + len(null)).

    Parameters
    ----------
    observed : float
    null : numpy.ndarray, shape (n_permutations,)
    greater_is_better : bool
        False for error metrics, where "at least as extreme" means ``<=``.

    Returns
    -------
    float
        NaN when ``observed`` is NaN or there are no permutations.
    """
    null = np.asarray(null, float)
    if not np.isfinite(observed) or null.size == 0:
        return float("nan")
    # Equal up to rounding counts as a tie: a permutation that cannot change the statistic
    # (e.g. fold-constant predictions) must give p = 1, not a p set by round-off.
    slack = 1e-9 * max(1.0, abs(observed))
    with np.errstate(invalid="ignore"):
        extreme = null >= observed - slack if greater_is_better else null <= observed + slack
    extreme |= ~np.isfinite(null)
    return float((1 + extreme.sum()) / (1 + null.size))


def permutation_test_from_scores(*, labels: np.ndarray, scores: np.ndarray, task_type: str,
                                 metric: str) -> PermutationResult:
    """Permutation test from out-of-fold scores of observed and permuted label columns.

    Parameters
    ----------
    labels : numpy.ndarray, shape (n_subjects, 1 + n_permutations)
        From :func:`permuted_labels`.
    scores : numpy.ndarray, shape (n_repeats, n_subjects, 1 + n_permutations)
        ``ProbeResult.scores`` obtained with ``labels`` on the same folds (in practice
        one repeat, the one whose folds are the permutation blocks).
    task_type : str
    metric : str
        Test statistic: the repeat-mean of this metric.

    Returns
    -------
    PermutationResult
    """
    values = metrics_by_repeat(labels=labels, scores=scores, task_type=task_type)
    if metric not in values:
        raise ValueError(f"metric {metric!r} is not computed for {task_type} tasks")
    statistic = values[metric].mean(axis=0)  # (1 + P,)
    observed, null = float(statistic[0]), statistic[1:]
    finite = null[np.isfinite(null)]
    return PermutationResult(
        metric=metric,
        observed=observed,
        p_value=permutation_p_value(observed=observed, null=null,
                                    greater_is_better=GREATER_IS_BETTER[metric]),
        null_mean=float(finite.mean()) if finite.size else float("nan"),
        null_sd=float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
        n_permutations=int(null.size),
    )


def permutation_test(*, score: Callable[[np.ndarray, Sequence[Split]], ProbeResult], y: np.ndarray,
                     splits: Sequence[Split], task_type: str, metric: str,
                     n_permutations: int = 200, seed: int = 0) -> PermutationResult:
    """Permutation test of one model on the first repeat's folds.

    Parameters
    ----------
    score : callable
        ``score(labels, splits) -> ProbeResult`` for a label matrix of shape
        (n_subjects, B), e.g. :func:`bh_models.evaluation.probe.cross_validated_scores` with the
        model's features bound.
    y : numpy.ndarray, shape (n_subjects,)
        Observed subject-level labels.
    splits : sequence of Split
        All splits of the task; those of repeat 0 are used.
    task_type : str
    metric : str
        Test statistic (e.g. ``auroc``, ``pearson_r``).
    n_permutations : int
    seed : int
        Seed of the permutations.

    Returns
    -------
    PermutationResult
    """
    first = [s for s in splits if s.repeat == 0]
    labels = permuted_labels(y=y, blocks=fold_of_subjects(splits=first),
                             n_permutations=n_permutations, seed=seed)
    result = score(labels, first)
    return permutation_test_from_scores(labels=labels, scores=result.scores, task_type=task_type,
                                        metric=metric)


def observed_and_permuted(*, score: Callable[[np.ndarray, Sequence[Split]], ProbeResult], y: np.ndarray,
                          splits: Sequence[Split], task_type: str, metric: str, n_permutations: int = 200,
                          seed: int = 0) -> tuple[ProbeResult, PermutationResult]:
    """Observed-label scores of every repeat and the permutation test, fitting the first repeat once.

    The first repeat's folds are fitted for the observed labels and the permutations in
    one label matrix (column 0 = observed; the solvers fit every column independently),
    and the other repeats for the observed labels alone. Calling ``score(y, splits)``
    and then :func:`permutation_test` would fit the first repeat twice.

    Parameters
    ----------
    score, y, splits, task_type, metric, n_permutations, seed
        As in :func:`permutation_test`.

    Returns
    -------
    observed : ProbeResult
        What ``score(y, splits)`` returns: scores (n_repeats, n_subjects, 1) and the
        penalty chosen in every split, in the order of ``splits``.
    test : PermutationResult
    """
    first = [s for s in splits if s.repeat == 0]
    others = [s for s in splits if s.repeat != 0]
    labels = permuted_labels(y=y, blocks=fold_of_subjects(splits=first), n_permutations=n_permutations, seed=seed)
    batch = score(labels, first)
    test = permutation_test_from_scores(labels=labels, scores=batch.scores, task_type=task_type, metric=metric)
    n_repeats = max(s.repeat for s in splits) + 1
    scores = np.full((n_repeats, len(y), 1), np.nan)
    scores[0] = batch.scores[0, :, :1]
    chosen = {id(s): batch.selected[i, :1] for i, s in enumerate(first)}
    if others:
        rest = score(np.asarray(y), others)
        scores[1:] = rest.scores[1:, :, :1]
        chosen.update({id(s): rest.selected[i, :1] for i, s in enumerate(others)})
    selected = np.stack([chosen[id(s)] for s in splits])
    return ProbeResult(scores=scores, selected=selected), test
