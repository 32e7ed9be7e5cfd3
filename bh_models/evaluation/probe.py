"""Linear probes on frozen embeddings: folds, batched solvers, nested CV, metrics.

Protocol
--------
* Folds are drawn over *subjects*, never over rows: a table with several rows per
  subject (e.g. TR-augmented variants) keeps all of a subject's rows on one side of
  every split, and the held-out predictions are averaged per subject.
* Outer: stratified k-fold (default 5), repeated with different seeds (default 10);
  regression targets are stratified on rank bins of the target.
* Inner: the penalty is chosen by leaving out each of the other k-1 outer folds in
  turn, inside the outer training subjects only; covariate regression and
  standardisation are refitted inside every inner and outer training fold.
* Classification: L2 logistic regression with balanced class weights (sklearn's
  ``LogisticRegression(C, class_weight="balanced")`` objective), penalty chosen by
  the validation log loss. Regression: ridge (sklearn's ``Ridge(alpha)``), penalty
  chosen by the validation mean squared error. Ties go to the stronger penalty.
* Metrics are computed per repeat on the pooled out-of-fold predictions (every
  subject predicted once per repeat) and summarised as mean +- sd over repeats.

Speed
-----
Everything that depends only on the features (covariate fit, scaling, an SVD of
the training fold) is computed once per fold and shared by many label columns.
The solvers fit all columns at once (batched Newton-CG for logistic, closed form for
ridge) in the rank-r space of the training fold (r <= n_train). The Newton steps use
Hessian-vector products only, so memory grows as n x columns, never as n x r^2. A
label-permutation test is then just more columns: :func:`cross_validated_scores` with
a label matrix whose column 0 is the observed labels and the others are permutations
(:func:`bh_models.evaluation.permutation.observed_and_permuted` shares the first
repeat's fits between the observed labels and the permutations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from bh_models.core.errors import BHConfigError
from bh_models.evaluation.targets import apply_covariate_regression, fit_covariate_regression

__desc__ = (
    "Frozen embeddings were evaluated with linear probes (scikit-learn, Pedregosa et al. 2011): "
    "L2-regularised logistic regression with balanced class weights for classification and "
    "ridge regression for regression, on features standardised within each training fold, "
    "with stratified {n_folds}-fold cross-validation over subjects repeated {n_repeats} times; "
    "the penalty was selected by an inner cross-validation over the training folds only."
)

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "f1", "f1_weighted", "auroc")
REGRESSION_METRICS = ("pearson_r", "mae")
PRIMARY_METRIC = {"classification": "auroc", "regression": "pearson_r"}
GREATER_IS_BETTER = {"accuracy": True, "balanced_accuracy": True, "f1": True,
                     "f1_weighted": True, "auroc": True, "pearson_r": True, "mae": False}
# Ascending C and descending alpha: both grids run from the strongest to the weakest
# penalty, so np.argmin's first-index tie-break prefers the simpler model.
DEFAULT_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_ALPHA_GRID = (1e5, 1e4, 1e3, 1e2, 1e1, 1.0, 1e-1)
# Elements of a (columns x rows) work array per solver batch (the Newton-CG solver's largest
# arrays are columns x rows and columns x parameters, ~160 MB float64 at this bound).
_BATCH_ELEMENTS = 20_000_000


@dataclass(frozen=True)
class Split:
    """One outer split, over subject positions (not rows).

    Attributes
    ----------
    repeat, fold : int
        Position in the repeated k-fold.
    train, test : numpy.ndarray of int
        Subject positions of the outer training and held-out folds.
    inner : tuple of (numpy.ndarray, numpy.ndarray)
        (fit, validation) subject positions of the inner folds, subsets of ``train``.
    """

    repeat: int
    fold: int
    train: np.ndarray
    test: np.ndarray
    inner: tuple[tuple[np.ndarray, np.ndarray], ...]


@dataclass(frozen=True)
class ProbeResult:
    """Out-of-fold scores of one model for every label column.

    Attributes
    ----------
    scores : numpy.ndarray, shape (n_repeats, n_subjects, n_columns)
        Probability of the positive class (classification) or the predicted value
        (regression), averaged over a subject's rows.
    selected : numpy.ndarray, shape (n_splits, n_columns)
        Penalty chosen by the inner CV (C or alpha; NaN for models without one).
    """

    scores: np.ndarray
    selected: np.ndarray


@dataclass(frozen=True)
class _FoldDesign:
    """Features of one training/held-out pair in the training fold's rank-r basis."""

    z_train: np.ndarray  # (n_train_rows, r) = U S of the standardised training rows
    z_test: np.ndarray  # (n_test_rows, r) = standardised test rows projected on V
    u_train: np.ndarray  # (n_train_rows, r)
    singular_values: np.ndarray  # (r,)


def derived_seed(*, seed: int, keys: Sequence[int]) -> int:
    """A 32-bit seed for sub-stream ``keys`` of ``seed`` (independent, reproducible).

    Parameters
    ----------
    seed : int
        The configured seed.
    keys : sequence of int
        Names the sub-stream, e.g. ``(repeat, fold)``.

    Returns
    -------
    int
    """
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0])


def probe_parameter_count(*, n_features: int, task_type: str, n_classes: int = 2) -> int:
    """Trainable parameters of the linear probe, in the paper's convention.

    A classification head is counted as ``n_classes`` outputs (768 x 2 + 2 = 1,538
    for 768-d embeddings and two classes), although the binary logistic model
    fitted here is its equivalent single-logit form. Regression: weights + bias.

    Parameters
    ----------
    n_features : int
        Embedding dimension (0 gives the bias-only chance model).
    task_type : str
        ``"classification"`` or ``"regression"``.
    n_classes : int
        Number of classes (classification only).

    Returns
    -------
    int
    """
    if task_type == "classification":
        return n_features * n_classes + n_classes
    return n_features + 1


def _strata(y: np.ndarray, task_type: str, n_folds: int) -> np.ndarray:
    """Class labels, or rank bins of ``n_folds`` subjects each for a continuous target."""
    if task_type == "classification":
        return np.asarray(y, dtype=np.int64)
    ranks = np.argsort(np.argsort(y, kind="stable"), kind="stable")
    bins = ranks // n_folds
    # A last, incomplete bin joins the one before, so that every bin fills every fold.
    if len(y) % n_folds and bins.max() > 0:
        bins[bins == bins.max()] -= 1
    return bins


def make_splits(*, y: np.ndarray, task_type: str, n_folds: int = 5, n_repeats: int = 10,
                seed: int = 0) -> list[Split]:
    """Repeated stratified k-fold over subjects; inner folds are the other outer folds.

    Classification folds are stratified by class, regression folds by rank bins of
    the target. The inner (tuning) folds of an outer split are its ``n_folds - 1``
    training folds, each left out once. Because every fold, inner or outer, is a
    union of outer folds, permuting labels *within* outer folds leaves every fold's
    label composition unchanged, which makes the permutation test on these same
    folds exact (:mod:`bh_models.evaluation.permutation`).

    Parameters
    ----------
    y : numpy.ndarray, shape (n_subjects,)
        Subject-level target (0/1 or continuous); folds are stratified on it.
    task_type : str
        ``"classification"`` or ``"regression"``.
    n_folds, n_repeats : int
        Outer folds (at least 3, so that tuning has 2 folds) and repeats.
    seed : int
        Base seed; repeat ``r`` uses sub-stream ``(seed, r)``.

    Returns
    -------
    list of Split
        ``n_repeats * n_folds`` splits, repeat-major.
    """
    y = np.asarray(y)
    strata = _strata(y, task_type, n_folds)
    smallest = int(np.bincount(strata).min()) if len(y) else 0
    if n_folds < 3 or smallest < n_folds:
        raise BHConfigError(
            "evaluate.n_folds",
            f"{n_folds} folds need at least 3 folds and {n_folds} subjects per class (or target "
            f"bin); the smallest class has {smallest}",
            "lower evaluate.n_folds (minimum 3) or drop the task for this dataset")
    splits = []
    for repeat in range(n_repeats):
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True,
                                   random_state=derived_seed(seed=seed, keys=(repeat,)))
        tests = [test for _, test in splitter.split(np.zeros(len(y)), strata)]
        for fold, test in enumerate(tests):
            others = [tests[j] for j in range(n_folds) if j != fold]
            inner = tuple((np.sort(np.concatenate(others[:j] + others[j + 1:])), validation)
                          for j, validation in enumerate(others))
            train = np.sort(np.concatenate(others))
            splits.append(Split(repeat=repeat, fold=fold, train=train, test=np.sort(test),
                                inner=inner))
    return splits


def fold_of_subjects(*, splits: Sequence[Split], repeat: int = 0) -> np.ndarray:
    """Outer test-fold index of every subject in one repeat.

    Parameters
    ----------
    splits : sequence of Split
    repeat : int

    Returns
    -------
    numpy.ndarray of int, shape (n_subjects,)
    """
    own = [s for s in splits if s.repeat == repeat]
    fold = np.full(sum(len(s.test) for s in own), -1, dtype=np.int64)
    for split in own:
        fold[split.test] = split.fold
    return fold


def rows_of_subjects(*, subjects: np.ndarray, row_subject: np.ndarray) -> np.ndarray:
    """Row indices of all rows that belong to the given subject positions.

    Parameters
    ----------
    subjects : numpy.ndarray of int
        Subject positions (e.g. ``Split.train``).
    row_subject : numpy.ndarray of int, shape (n_rows,)
        Subject position of every feature row.

    Returns
    -------
    numpy.ndarray of int
        Sorted row indices.
    """
    return np.flatnonzero(np.isin(row_subject, subjects))


def _prepare_fold(*, features: np.ndarray, covariates: np.ndarray | None,
                  train_rows: np.ndarray, test_rows: np.ndarray) -> _FoldDesign:
    """Covariate regression, standardisation and SVD, all fitted on ``train_rows`` only."""
    x_train, x_test = features[train_rows], features[test_rows]
    if covariates is not None and covariates.shape[1]:
        coefficients = fit_covariate_regression(features=x_train, covariates=covariates[train_rows])
        x_train = apply_covariate_regression(features=x_train, covariates=covariates[train_rows],
                                             coefficients=coefficients)
        x_test = apply_covariate_regression(features=x_test, covariates=covariates[test_rows],
                                            coefficients=coefficients)
    mean = x_train.mean(axis=0)
    scale = x_train.std(axis=0)
    # Constant features carry nothing; scale 1 leaves them at 0 (StandardScaler's rule).
    scale[scale < 10 * np.finfo(float).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
    x_train = (x_train - mean) / scale
    x_test = (x_test - mean) / scale
    u, s, vt = np.linalg.svd(x_train, full_matrices=False)  # u (n, k), s (k,), vt (k, d)
    keep = s > s.max(initial=0.0) * max(x_train.shape) * np.finfo(float).eps
    u, s, vt = u[:, keep], s[keep], vt[keep]
    return _FoldDesign(z_train=u * s, z_test=x_test @ vt.T, u_train=u, singular_values=s)


def _balanced_weights(y: np.ndarray) -> np.ndarray:
    """sklearn's ``class_weight="balanced"`` per column: n / (2 * n_class), shape like ``y``."""
    n = y.shape[0]
    n_pos = y.sum(axis=0)
    w_pos = n / (2.0 * np.maximum(n_pos, 1))
    w_neg = n / (2.0 * np.maximum(n - n_pos, 1))
    return np.where(y == 1, w_pos, w_neg)


def fit_logistic_batch(*, z: np.ndarray, y: np.ndarray, c: np.ndarray, sample_weight: np.ndarray,
                       max_iter: int = 100, tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """L2 logistic regressions for many label columns at once (batched Newton-CG).

    Minimises, per column b, ``C_b * sum_i w_ib * logloss(y_ib, z_i . beta_b + a_b)
    + 0.5 * ||beta_b||^2`` with an unpenalised intercept ``a_b``, i.e. sklearn's
    ``LogisticRegression(C=C_b)`` objective. Each Newton step is solved by
    conjugate gradients preconditioned with the Hessian's diagonal, using
    Hessian-vector products: ``Z^T (D (Z v)) + v / C``, two (n x p) @ (p x B)
    products, so nothing of size n x p^2 or B x p^2 is ever formed (memory grows
    as n x B, not as n x r^2), then a backtracking line search.

    Parameters
    ----------
    z : numpy.ndarray, shape (n, r)
        Design (no intercept column).
    y : numpy.ndarray, shape (n, B)
        0/1 labels, one column per problem.
    c : numpy.ndarray, shape (B,)
        Inverse penalty strength per column.
    sample_weight : numpy.ndarray, shape (n, B)
    max_iter : int
        Newton iterations at most.
    tol : float
        Stop when every column's gradient max-norm is below ``tol * sum(weights)``.

    Returns
    -------
    coef : numpy.ndarray, shape (B, r)
    intercept : numpy.ndarray, shape (B,)
    """
    n, r = z.shape
    n_columns = y.shape[1]
    per_batch = max(1, _BATCH_ELEMENTS // (4 * n + 6 * (r + 1)))  # the solver keeps ~4 (B, n) and ~6 (B, p) arrays
    theta = np.zeros((n_columns, r + 1))
    for start in range(0, n_columns, per_batch):
        cols = slice(start, start + per_batch)
        theta[cols] = _newton_cg_logistic(z=z, y=y[:, cols], c=np.asarray(c, float)[cols],
                                          w=sample_weight[:, cols], max_iter=max_iter, tol=tol)
    return theta[:, :r], theta[:, r]


#: Conjugate-gradient iterations per Newton step at most (each costs two (n x p) @ (p x B) products).
_MAX_CG = 500


def _newton_cg_logistic(*, z: np.ndarray, y: np.ndarray, c: np.ndarray, w: np.ndarray,
                        max_iter: int, tol: float) -> np.ndarray:
    n, r = z.shape
    za = np.hstack([z, np.ones((n, 1))])  # (n, p) with p = r + 1; last column = intercept
    za2 = za * za  # (n, p): the Hessian's diagonal is curvature @ za2
    p = r + 1
    yt, wt = y.T.astype(float), w.T.astype(float)  # (B, n)
    # Dividing the sklearn objective by C: weighted loss + (1 / 2C) ||beta||^2; a tiny ridge
    # keeps the intercept's direction well posed when a column has a single class.
    penalty = np.outer(1.0 / c, np.r_[np.ones(r), 0.0])  # (B, p)
    ridge = penalty + 1e-12
    theta = np.zeros((len(c), p))
    obj = _logistic_objective(theta, za, yt, wt, penalty)
    threshold = tol * wt.sum(1)
    active = np.ones(len(c), dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        prob = expit(theta[idx] @ za.T)  # (b, n)
        grad = (wt[idx] * (prob - yt[idx])) @ za + penalty[idx] * theta[idx]  # (b, p)
        moving = np.abs(grad).max(1) > threshold[idx]
        active[idx[~moving]] = False
        idx, prob, grad = idx[moving], prob[moving], grad[moving]
        if not idx.size:
            break
        curvature = wt[idx] * prob * (1.0 - prob)  # (b, n)
        step = _pcg(za=za, curvature=curvature, diagonal=curvature @ za2 + ridge[idx], shift=ridge[idx],
                    rhs=grad, threshold=threshold[idx])
        # Backtracking line search, evaluated only for the columns still searching.
        pending, t = idx, 1.0
        for _ in range(30):
            candidate = theta[pending] - t * step[np.searchsorted(idx, pending)]
            cand_obj = _logistic_objective(candidate, za, yt[pending], wt[pending], penalty[pending])
            # Relative slack: at the optimum, rounding alone must not count as an increase.
            accepted = cand_obj <= obj[pending] + 1e-13 * np.abs(obj[pending])
            theta[pending[accepted]] = candidate[accepted]
            obj[pending[accepted]] = cand_obj[accepted]
            pending, t = pending[~accepted], t / 2.0
            if not pending.size:
                break
        # No decrease along the Newton direction: the column sits at its optimum.
        active[pending] = False
    return theta


def _pcg(*, za: np.ndarray, curvature: np.ndarray, diagonal: np.ndarray, shift: np.ndarray, rhs: np.ndarray,
         threshold: np.ndarray) -> np.ndarray:
    """Solve ``(za^T diag(curvature_b) za + diag(shift_b)) x_b = rhs_b`` for every row b (Jacobi-preconditioned CG).

    A column stops when its residual is below ``min(0.1, sqrt(|rhs|)) |rhs|`` (an inexact
    Newton step, superlinear near the optimum) or below a tenth of the gradient threshold.
    """
    x = np.zeros_like(rhs)  # (b, p)
    residual = rhs.copy()
    preconditioned = residual / diagonal
    direction = preconditioned.copy()
    rz = np.einsum("bp,bp->b", residual, preconditioned)
    norm = np.linalg.norm(rhs, axis=1)
    target = np.maximum(np.minimum(0.1, np.sqrt(norm)) * norm, 0.1 * threshold)
    running = np.arange(len(rhs))
    for _ in range(_MAX_CG):
        d = direction[running]
        hd = ((d @ za.T) * curvature[running]) @ za + shift[running] * d  # (b, n) -> (b, p)
        alpha = rz[running] / np.einsum("bp,bp->b", d, hd)
        x[running] += alpha[:, None] * d
        residual[running] -= alpha[:, None] * hd
        done = np.linalg.norm(residual[running], axis=1) <= target[running]
        running = running[~done]
        if not running.size:
            break
        preconditioned = residual[running] / diagonal[running]
        rz_new = np.einsum("bp,bp->b", residual[running], preconditioned)
        direction[running] = preconditioned + (rz_new / rz[running])[:, None] * direction[running]
        rz[running] = rz_new
    return x


def _logistic_objective(theta: np.ndarray, za: np.ndarray, yt: np.ndarray, wt: np.ndarray,
                        penalty: np.ndarray) -> np.ndarray:
    """Penalised weighted logistic loss per column, shape (B,)."""
    eta = theta @ za.T  # (B, n)
    return (wt * (np.logaddexp(0.0, eta) - yt * eta)).sum(1) + 0.5 * (penalty * theta**2).sum(1)


def _logistic_scores(design: _FoldDesign, y: np.ndarray, c: np.ndarray,
                     class_weight: str | None) -> np.ndarray:
    """Fit per column on the training rows; held-out probabilities, shape (n_test_rows, B)."""
    weight = _balanced_weights(y) if class_weight == "balanced" else np.ones(y.shape)
    coef, intercept = fit_logistic_batch(z=design.z_train, y=y, c=c, sample_weight=weight)
    return expit(design.z_test @ coef.T + intercept)  # (n_test, r) @ (r, B) -> (n_test, B)


def _ridge_scores(design: _FoldDesign, y: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Closed-form ridge per column; held-out predictions, shape (n_test_rows, B)."""
    y_mean = y.mean(axis=0)
    projected = design.u_train.T @ (y - y_mean)  # (r, B)
    s = design.singular_values[:, None]  # (r, 1)
    coef = projected * s / (s**2 + alpha[None, :])  # (r, B): (S^2 + alpha)^-1 S U^T y
    return design.z_test @ coef + y_mean


def _validation_loss(y: np.ndarray, scores: np.ndarray, task_type: str,
                     class_weight: str | None) -> np.ndarray:
    """Mean validation loss per column: (balanced) log loss or squared error."""
    if task_type == "regression":
        return ((y - scores) ** 2).mean(axis=0)
    prob = np.clip(scores, 1e-15, 1 - 1e-15)
    loss = -(y * np.log(prob) + (1 - y) * np.log1p(-prob))
    weight = _balanced_weights(y) if class_weight == "balanced" else np.ones(y.shape)
    return (weight * loss).sum(axis=0) / weight.sum(axis=0)


def _fold_scores(design: _FoldDesign, y: np.ndarray, penalty: np.ndarray, task_type: str,
                 class_weight: str | None) -> np.ndarray:
    if task_type == "classification":
        return _logistic_scores(design, y, penalty, class_weight)
    return _ridge_scores(design, y, penalty)


def cross_validated_scores(*, features: np.ndarray, row_subject: np.ndarray, labels: np.ndarray,
                           splits: Sequence[Split], task_type: str,
                           covariates: np.ndarray | None = None,
                           penalty_grid: Sequence[float] | None = None,
                           class_weight: str | None = "balanced",
                           progress: str | None = None, threads: int = 1) -> ProbeResult:
    """Nested-CV linear-probe scores for every label column on the given folds.

    Parameters
    ----------
    features : numpy.ndarray, shape (n_rows, n_features)
        One row per subject, or several (all of a subject's rows move together).
    row_subject : numpy.ndarray of int, shape (n_rows,)
        Subject position (0 .. n_subjects-1) of every row.
    labels : numpy.ndarray, shape (n_subjects,) or (n_subjects, B)
        Subject-level targets; extra columns (e.g. permuted labels) share all the
        feature-dependent work.
    splits : sequence of Split
        From :func:`make_splits` (the same folds for every model of a task).
    task_type : str
        ``"classification"`` (logistic) or ``"regression"`` (ridge).
    covariates : numpy.ndarray or None, shape (n_subjects, n_covariates)
        Regressed out of the features inside every training fold.
    penalty_grid : sequence of float or None
        C values (classification) or alphas (regression), strongest penalty first;
        defaults to :data:`DEFAULT_C_GRID` / :data:`DEFAULT_ALPHA_GRID`.
    class_weight : {"balanced", None}
        Class weighting of the logistic loss and of its validation loss.
    progress : str or None
        tqdm description; None hides the bar.
    threads : int
        BLAS threads. The work is many tiny matrices, where one thread is fastest.

    Returns
    -------
    ProbeResult
    """
    labels = np.asarray(labels)
    labels = labels[:, None] if labels.ndim == 1 else labels  # (n_subjects, B)
    features = np.asarray(features, dtype=float)
    row_subject = np.asarray(row_subject)
    if features.shape[0] != row_subject.shape[0]:
        raise ValueError("features and row_subject must have the same number of rows")
    if penalty_grid is None:
        penalty_grid = DEFAULT_C_GRID if task_type == "classification" else DEFAULT_ALPHA_GRID
    row_covariates = None if covariates is None else np.asarray(covariates, float)[row_subject]
    rows = _Rows(features=features, subject=row_subject, labels=labels[row_subject],
                 covariates=row_covariates)
    n_subjects, n_columns = labels.shape
    n_repeats = max(s.repeat for s in splits) + 1
    scores = np.full((n_repeats, n_subjects, n_columns), np.nan)
    selected = np.full((len(splits), n_columns), np.nan)
    with threadpool_limits(limits=threads):
        for index, split in enumerate(tqdm(splits, desc=progress,
                                           disable=None if progress else True, leave=False)):
            selected[index], scores[split.repeat, split.test] = _fit_split(
                split=split, rows=rows, grid=np.asarray(penalty_grid, dtype=float),
                task_type=task_type, class_weight=class_weight)
    return ProbeResult(scores=scores, selected=selected)


@dataclass(frozen=True)
class _Rows:
    """Row-level inputs of the probe (labels and covariates copied from the row's subject)."""

    features: np.ndarray  # (n_rows, n_features)
    subject: np.ndarray  # (n_rows,) subject position
    labels: np.ndarray  # (n_rows, B)
    covariates: np.ndarray | None  # (n_rows, n_covariates)

    def of(self, subjects: np.ndarray) -> np.ndarray:
        return rows_of_subjects(subjects=subjects, row_subject=self.subject)


def _fit_split(*, split: Split, rows: _Rows, grid: np.ndarray, task_type: str,
               class_weight: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Penalty per column chosen on the inner folds; held-out subject scores, shape (n_test, B)."""
    train_rows, test_rows = rows.of(split.train), rows.of(split.test)
    if np.intersect1d(rows.subject[train_rows], rows.subject[test_rows]).size:
        raise AssertionError("a subject is on both sides of a split")  # excluded by construction
    n_columns = rows.labels.shape[1]
    # Inner CV: every penalty for every column in one batch of len(grid) * B problems.
    loss = np.zeros((len(grid), n_columns))
    for fit_subjects, val_subjects in split.inner:
        fit_rows, val_rows = rows.of(fit_subjects), rows.of(val_subjects)
        design = _prepare_fold(features=rows.features, covariates=rows.covariates,
                               train_rows=fit_rows, test_rows=val_rows)
        y_fit = np.tile(rows.labels[fit_rows], len(grid))  # (n_fit, G * B), grid-major
        val_scores = _fold_scores(design, y_fit, np.repeat(grid, n_columns), task_type,
                                  class_weight)
        val_y = np.tile(rows.labels[val_rows], len(grid))  # (n_val, G * B)
        loss += _validation_loss(val_y, val_scores, task_type, class_weight).reshape(
            len(grid), n_columns)  # (G * B,) -> (G, B)
    chosen = grid[np.argmin(loss, axis=0)]  # (B,); first minimum = strongest penalty
    design = _prepare_fold(features=rows.features, covariates=rows.covariates,
                           train_rows=train_rows, test_rows=test_rows)
    row_scores = _fold_scores(design, rows.labels[train_rows], chosen, task_type, class_weight)
    return chosen, subject_means(values=row_scores, row_subject=rows.subject[test_rows],
                                 subjects=split.test)


def subject_means(*, values: np.ndarray, row_subject: np.ndarray,
                  subjects: np.ndarray) -> np.ndarray:
    """Average row-level values per subject.

    Parameters
    ----------
    values : numpy.ndarray, shape (n_rows, B)
    row_subject : numpy.ndarray of int, shape (n_rows,)
    subjects : numpy.ndarray of int, shape (n_subjects_out,)
        Output order; every subject must own at least one row.

    Returns
    -------
    numpy.ndarray, shape (n_subjects_out, B)
    """
    position = np.searchsorted(np.sort(subjects), row_subject)
    order = np.argsort(subjects)
    sums = np.zeros((len(subjects), values.shape[1]))
    np.add.at(sums, position, values)
    counts = np.bincount(position, minlength=len(subjects))[:, None]
    means_sorted = sums / counts
    out = np.empty_like(means_sorted)
    out[order] = means_sorted
    return out


def classification_metrics(*, y_true: np.ndarray, scores: np.ndarray,
                           threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, F1 (positive class and support-weighted), AUROC.

    Vectorised over columns; values match sklearn.metrics for each column.

    Parameters
    ----------
    y_true : numpy.ndarray, shape (n,) or (n, B)
        0/1 labels (one column, or one per score column).
    scores : numpy.ndarray, shape (n,) or (n, B)
        Probability of class 1; predicted class 1 when above ``threshold``.

    Returns
    -------
    dict of str to numpy.ndarray of shape (B,)
    """
    s = np.asarray(scores, float)
    s = s[:, None] if s.ndim == 1 else s
    y = np.asarray(y_true)
    y = np.broadcast_to(y[:, None] if y.ndim == 1 else y, s.shape)
    n = y.shape[0]
    positive = y == 1
    predicted = s > threshold
    tp = (predicted & positive).sum(0)
    fp = (predicted & ~positive).sum(0)
    fn = (~predicted & positive).sum(0)
    tn = n - tp - fp - fn
    n_pos = positive.sum(0)
    n_neg = n - n_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        recall_pos = tp / n_pos
        recall_neg = tn / n_neg
        f1_pos = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        f1_neg = np.where(2 * tn + fn + fp > 0, 2 * tn / np.maximum(2 * tn + fn + fp, 1), 0.0)
        ranks = rankdata(s, axis=0)  # average ranks for ties
        auroc = ((ranks * positive).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {
        "accuracy": (tp + tn) / n,
        "balanced_accuracy": (recall_pos + recall_neg) / 2,
        "f1": f1_pos,
        "f1_weighted": (n_pos * f1_pos + n_neg * f1_neg) / n,
        "auroc": auroc,
    }


def regression_metrics(*, y_true: np.ndarray, predictions: np.ndarray) -> dict[str, np.ndarray]:
    """Pearson r and mean absolute error, vectorised over columns.

    Parameters
    ----------
    y_true : numpy.ndarray, shape (n,) or (n, B)
    predictions : numpy.ndarray, shape (n,) or (n, B)

    Returns
    -------
    dict of str to numpy.ndarray of shape (B,)
        ``pearson_r`` is NaN where the predictions (or targets) are constant.
    """
    p = np.asarray(predictions, float)
    p = p[:, None] if p.ndim == 1 else p
    y = np.asarray(y_true, float)
    y = np.broadcast_to(y[:, None] if y.ndim == 1 else y, p.shape)
    yc = y - y.mean(0)
    pc = p - p.mean(0)
    denominator = np.sqrt((yc**2).sum(0) * (pc**2).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(denominator > 1e-12 * np.abs(y).sum(0).clip(1), (yc * pc).sum(0) / denominator,
                     np.nan)
    return {"pearson_r": r, "mae": np.abs(y - p).mean(0)}


def metrics_by_repeat(*, labels: np.ndarray, scores: np.ndarray,
                      task_type: str) -> dict[str, np.ndarray]:
    """Every metric for every repeat and label column.

    Parameters
    ----------
    labels : numpy.ndarray, shape (n_subjects,) or (n_subjects, B)
    scores : numpy.ndarray, shape (n_repeats, n_subjects, B)
        ``ProbeResult.scores``.
    task_type : str

    Returns
    -------
    dict of str to numpy.ndarray of shape (n_repeats, B)
    """
    per_repeat = []
    for repeat_scores in scores:
        if task_type == "classification":
            per_repeat.append(classification_metrics(y_true=labels, scores=repeat_scores))
        else:
            per_repeat.append(regression_metrics(y_true=labels, predictions=repeat_scores))
    return {name: np.stack([m[name] for m in per_repeat]) for name in per_repeat[0]}


def mean_sd(*, values: np.ndarray) -> tuple[float, float]:
    """Mean and sample sd (0 for a single value) of a 1-d array of per-repeat metrics."""
    values = np.asarray(values, float)
    sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    return float(np.mean(values)), sd
