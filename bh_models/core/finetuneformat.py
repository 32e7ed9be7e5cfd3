"""The files between the evaluation stage and the fine-tuning job: folds in, out-of-fold predictions out.

Fine-tuning the Harmonizer is a models-stage job (:mod:`bh_models.models.finetune`,
GPU when there is one); the evaluation stage owns the folds and the metrics
(:mod:`bh_models.evaluation.finetune`). They exchange two small TSVs:

Folds (written by the evaluation stage, read by the job)
    One line per task, repeat and subject: ``task``, ``task_type``
    (``classification`` or ``regression``), ``repeat``, ``fold`` (the outer fold
    that holds the subject out), ``dataset``, ``subject`` (label without
    ``sub-``), ``label`` (0/1, or the value). The probes' folds exactly, so the
    fine-tuned model is scored on the same held-out subjects.

Predictions (written by the job, read by the evaluation stage)
    One line per task, repeat and subject: ``task``, ``repeat``, ``fold``,
    ``dataset``, ``subject``, ``score`` (positive-class probability, or the
    predicted value in the target's units), averaged over the subject's rows,
    from the model trained without the subject's fold.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bh_models.core.errors import BHInputError
from bh_models.core.jsonio import write_tsv

FOLDS_COLUMNS = ("task", "task_type", "repeat", "fold", "dataset", "subject", "label")
PREDICTION_COLUMNS = ("task", "repeat", "fold", "dataset", "subject", "score")
TASK_TYPES = ("classification", "regression")


def _read(path: Path, columns: tuple[str, ...], what: str, fix: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, f"{what} not found", fix)
    table = pd.read_csv(path, sep="\t", dtype={"task": str, "dataset": str, "subject": str}, keep_default_na=False)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise BHInputError(path, f"{what} lacks the columns {missing}", fix)
    for column in ("repeat", "fold"):
        table[column] = table[column].astype(int)
    return table[list(columns)]


def write_folds(table: pd.DataFrame, path: Path) -> Path:
    """Write a folds table (columns :data:`FOLDS_COLUMNS`), byte-stable."""
    bad = set(table["task_type"]) - set(TASK_TYPES)
    if bad:
        raise ValueError(f"task types {sorted(bad)} are not {TASK_TYPES}")
    return write_tsv(table[list(FOLDS_COLUMNS)], path, float_format="%.10g")


def read_folds(path: Path) -> pd.DataFrame:
    """Read a folds table written by :func:`write_folds`."""
    table = _read(path, FOLDS_COLUMNS, "fine-tuning folds", "rerun the finetune_folds rule of the evaluation stage")
    table["label"] = table["label"].astype(float)
    return table


def write_predictions(table: pd.DataFrame, path: Path) -> Path:
    """Write out-of-fold predictions (columns :data:`PREDICTION_COLUMNS`), byte-stable."""
    return write_tsv(table[list(PREDICTION_COLUMNS)], path, float_format="%.8g")


def read_predictions(path: Path) -> pd.DataFrame:
    """Read predictions written by :func:`write_predictions`."""
    table = _read(path, PREDICTION_COLUMNS, "fine-tuned predictions", "rerun the finetune rule of the models stage")
    table["score"] = table["score"].astype(float)
    return table
