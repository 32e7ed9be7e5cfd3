"""Repetition time (TR) of a BOLD run: which source wins, and is it plausible.

Precedence: the dataset's config override, then the sidecar ``RepetitionTime``
(the caller resolves BIDS inheritance, so a value from ``task-rest_bold.json``
at the dataset root arrives here like a run-level one). The NIfTI header's
``pixdim[4]`` is never the source, because converters often leave it at 0 or 1;
it is only compared, and a disagreement becomes a warning that travels in the
output sidecar. Without an override or a sidecar value the run fails: a wrong
TR silently corrupts every filter and every TR-aware position encoding
downstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib

from bh_models.core.errors import BHConfigError, BHInputError

__desc__ = (
    "The repetition time of each run was taken from its BIDS sidecar (with BIDS "
    "inheritance) unless the dataset's configuration overrides it, checked "
    "against the NIfTI header, and carried with every output."
)

MAX_TR_S = 10.0  # slower sampling than this is not resting-state fMRI
HEADER_TOLERANCE_S = 1e-3  # float32 headers store 0.735 as 0.73500001

_TIME_UNIT_SECONDS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}


@dataclass(frozen=True)
class RepetitionTime:
    """A resolved TR.

    Attributes
    ----------
    seconds : float
        The TR used for this run.
    source : str
        ``"override"`` or ``"sidecar"``.
    header_seconds : float or None
        The NIfTI header's TR, when it states one.
    warnings : list of str
        Human-readable notes for the output sidecar (e.g. header disagreement).
    """

    seconds: float
    source: str
    header_seconds: float | None
    warnings: list[str] = field(default_factory=list)


def header_tr(img: nib.Nifti1Image) -> float | None:
    """TR in seconds from a NIfTI header, or None when the header gives none.

    ``pixdim[4]`` is read in the header's time unit (seconds when unset). A
    value of 0 or a non-time unit means "not stated".
    """
    zooms = img.header.get_zooms()
    if len(zooms) < 4:
        return None
    value = float(zooms[3])
    _, time_unit = img.header.get_xyzt_units()
    scale = _TIME_UNIT_SECONDS.get(time_unit, 1.0 if time_unit == "unknown" else None)
    if scale is None or not math.isfinite(value) or value <= 0:
        return None
    return value * scale


def _check_range(value: float, *, source: str, bold: Path) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problem = f"RepetitionTime {value!r} is not a number"
    elif value <= 0:
        problem = f"RepetitionTime {value} s is not positive"
    elif value > MAX_TR_S:
        problem = f"RepetitionTime {value} s is above {MAX_TR_S:g} s (milliseconds given as seconds?)"
    else:
        return
    if source == "override":
        raise BHConfigError(
            "tr_override", f"{problem} (for {bold})", f"set a TR in seconds, 0 < TR <= {MAX_TR_S:g}"
        )
    raise BHInputError(
        bold,
        f"{problem} in its JSON sidecar (after BIDS inheritance)",
        f"correct RepetitionTime (seconds, 0 < TR <= {MAX_TR_S:g}) in the sidecar, "
        "or set the dataset's tr_override in config.yaml",
    )


def resolve_tr(
    *,
    bold: Path,
    img: nib.Nifti1Image,
    tr_sidecar: float | None,
    tr_override: float | None = None,
) -> RepetitionTime:
    """Decide the TR of one BOLD run.

    Parameters
    ----------
    bold : Path
        The BOLD file (named in messages).
    img : Nifti1Image
        Its loaded header (for the header TR).
    tr_sidecar : float or None
        ``RepetitionTime`` from the sidecar, BIDS inheritance already resolved.
    tr_override : float or None
        The dataset's configured TR; wins over everything.

    Returns
    -------
    RepetitionTime
        Seconds, source, header value and warnings.

    Raises
    ------
    BHInputError
        No sidecar TR and no override, or a sidecar TR outside (0, 10] s.
    BHConfigError
        An override outside (0, 10] s.
    """
    header = header_tr(img)
    warnings: list[str] = []
    if tr_override is not None:
        _check_range(tr_override, source="override", bold=bold)
        seconds, source = float(tr_override), "override"
        if tr_sidecar is not None and abs(float(tr_sidecar) - seconds) > HEADER_TOLERANCE_S:
            warnings.append(
                f"config tr_override {seconds:g} s replaces the sidecar RepetitionTime {float(tr_sidecar):g} s"
            )
    elif tr_sidecar is not None:
        _check_range(tr_sidecar, source="sidecar", bold=bold)
        seconds, source = float(tr_sidecar), "sidecar"
    else:
        stated = f"; the NIfTI header says {header:g} s" if header is not None else ""
        raise BHInputError(
            bold,
            f"no RepetitionTime in its JSON sidecar or any inherited sidecar{stated}",
            "add RepetitionTime (seconds) to the run's or the dataset's *_bold.json, "
            "or set the dataset's tr_override in config.yaml",
        )
    if header is not None and abs(header - seconds) > HEADER_TOLERANCE_S:
        warnings.append(
            f"NIfTI header TR {header:g} s disagrees with the {source} TR {seconds:g} s; "
            f"the {source} value was used"
        )
    return RepetitionTime(seconds=seconds, source=source, header_seconds=header, warnings=warnings)
