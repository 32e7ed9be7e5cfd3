"""Tests of bh_models.func.tr: TR precedence, header comparison and range checks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.func.tr import header_tr, resolve_tr

BOLD = Path("sub-01/func/sub-01_task-rest_bold.nii.gz")


def _img(tr: float | None, unit: str = "sec") -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.zeros((2, 2, 2, 3), dtype=np.float32), np.eye(4))
    img.header.set_xyzt_units("mm", unit)
    img.header.set_zooms((1.0, 1.0, 1.0, 0.0 if tr is None else tr))
    return img


def test_sidecar_is_used_and_agreeing_header_is_silent():
    tr = resolve_tr(bold=BOLD, img=_img(0.735), tr_sidecar=0.735)
    assert (tr.seconds, tr.source, tr.warnings) == (0.735, "sidecar", [])
    assert tr.header_seconds == pytest.approx(0.735)


def test_sidecar_wins_over_disagreeing_header_with_a_warning():
    tr = resolve_tr(bold=BOLD, img=_img(1.0), tr_sidecar=2.0)
    assert tr.seconds == 2.0 and tr.source == "sidecar"
    assert len(tr.warnings) == 1 and "header TR 1 s disagrees" in tr.warnings[0]


def test_override_wins_over_sidecar_and_header():
    tr = resolve_tr(bold=BOLD, img=_img(1.0), tr_sidecar=2.0, tr_override=0.8)
    assert tr.seconds == 0.8 and tr.source == "override"
    assert any("replaces the sidecar" in w for w in tr.warnings)
    assert any("header TR 1 s" in w for w in tr.warnings)


def test_no_sidecar_and_no_override_fails_naming_file_and_header_value():
    with pytest.raises(BHInputError) as err:
        resolve_tr(bold=BOLD, img=_img(2.0), tr_sidecar=None)
    assert err.value.path == str(BOLD)
    assert "no RepetitionTime" in err.value.problem and "header says 2 s" in err.value.problem
    assert "tr_override" in err.value.fix


@pytest.mark.parametrize("bad", [0.0, -2.0, 10.5, 2000.0, float("nan")])
def test_implausible_sidecar_tr_fails(bad):
    with pytest.raises(BHInputError) as err:
        resolve_tr(bold=BOLD, img=_img(None), tr_sidecar=bad)
    assert err.value.path == str(BOLD)


def test_ten_seconds_is_still_allowed():
    assert resolve_tr(bold=BOLD, img=_img(None), tr_sidecar=10.0).seconds == 10.0


@pytest.mark.parametrize("bad", [0, -1.0, 11.0])
def test_implausible_override_is_a_config_error(bad):
    with pytest.raises(BHConfigError) as err:
        resolve_tr(bold=BOLD, img=_img(2.0), tr_sidecar=2.0, tr_override=bad)
    assert err.value.key == "tr_override"


def test_header_units_and_missing_values():
    assert header_tr(_img(2000.0, unit="msec")) == pytest.approx(2.0)
    assert header_tr(_img(None)) is None
    three_d = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.float32), np.eye(4))
    assert header_tr(three_d) is None
