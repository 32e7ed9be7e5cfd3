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
