"""Ground-truth recovery compares like with like: the truth goes through the same cleaning."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from nilearn.signal import clean

from bh_models.demo.recovery import confounds_of, recovery_table


def test_truth_cleaned_like_the_output_recovers_exactly(tmp_path):
    rng = np.random.default_rng(0)
    n, p, tr = 120, 400, 2.0
    columns = [f"roi{i}" for i in range(p)]
    truth = rng.standard_normal((n, p))
    motion = rng.standard_normal((n, 24))
    cleaned = clean(truth, t_r=tr, detrend=True, high_pass=0.01, confounds=motion, standardize=None)
    recovered = tmp_path / "sub-01_task-rest_space-MNI_timeseries.tsv"
    pd.DataFrame(cleaned, columns=columns).to_csv(recovered, sep="\t", index=False)
    recovered.with_suffix(".json").write_text(json.dumps({"RepetitionTime": tr}))
    confounds = pd.DataFrame(motion, columns=[f"m{i}" for i in range(24)])
    confounds["framewise_displacement"] = np.nan
    confounds["censored"] = 0
    confounds.to_csv(confounds_of(recovered), sep="\t", index=False, na_rep="n/a")
    truth_file = tmp_path / "truth.tsv"
    pd.DataFrame(truth, columns=columns).to_csv(truth_file, sep="\t", index=False)

    table = recovery_table(pairs=[(recovered, truth_file)], detrend=True, high_pass=0.01, low_pass=None)
    assert table["n_parcels"].iloc[0] == 400
    assert table["median_r"].iloc[0] > 0.999

    confounds_of(recovered).unlink()  # without the regressors in the reference, r drops: they matter
    pd.DataFrame({"framewise_displacement": [np.nan] * n, "censored": 0}).to_csv(
        confounds_of(recovered), sep="\t", index=False, na_rep="n/a")
    assert recovery_table(pairs=[(recovered, truth_file)], detrend=True, high_pass=0.01,
                          low_pass=None)["median_r"].iloc[0] < 0.95


def test_truth_in_7_network_order_matches_a_17_network_recovery(tmp_path):
    """The demo's truth is in 7-network order; the chain's default output is 17-network order."""
    from bh_models.core.templates import atlas_labels, schaefer_7_to_17
    from bh_models.demo.recovery import truth_in_recovered_order

    rng = np.random.default_rng(1)
    names7, names17 = atlas_labels(7)["name"].tolist(), atlas_labels(17)["name"].tolist()
    truth = pd.DataFrame(rng.standard_normal((50, 400)), columns=names7)
    seventeen = truth_in_recovered_order(truth=truth, recovered_columns=names17)
    assert list(seventeen.columns) == names17
    label17 = schaefer_7_to_17()  # 1-based 17-network label of each 7-network parcel
    for i in (0, 57, 199, 200, 399):  # parcel 7-row i is 17-row label17[i] - 1, column by column
        assert np.array_equal(seventeen.iloc[:, label17[i] - 1].to_numpy(), truth.iloc[:, i].to_numpy())
    back = truth_in_recovered_order(truth=seventeen, recovered_columns=names7)
    assert back.equals(truth)
    # Same network (e.g. visual) parcels keep their hemisphere: an LH name maps to an LH name.
    assert all(("_LH_" in a) == ("_LH_" in b) for a, b in zip(names7, np.array(names17)[label17 - 1]))

    tr = 2.0
    recovered = tmp_path / "sub-01_task-rest_space-MNI_timeseries.tsv"
    cleaned = clean(seventeen.to_numpy(), t_r=tr, detrend=True, high_pass=0.01, standardize=None)
    pd.DataFrame(cleaned, columns=names17).to_csv(recovered, sep="\t", index=False)
    recovered.with_suffix(".json").write_text(json.dumps({"RepetitionTime": tr}))
    pd.DataFrame({"framewise_displacement": [np.nan] * 50, "censored": 0}).to_csv(
        confounds_of(recovered), sep="\t", index=False, na_rep="n/a")
    truth_file = tmp_path / "truth.tsv"
    truth.to_csv(truth_file, sep="\t", index=False)
    table = recovery_table(pairs=[(recovered, truth_file)], detrend=True, high_pass=0.01, low_pass=None)
    assert table["median_r"].iloc[0] > 0.999
