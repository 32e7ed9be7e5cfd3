"""TR-downsampling augmentation and the TAPE patch plan.

Each cleaned parcel time series (T frames x 400 ROIs, repetition time TR) yields
one training sample per configured downsampling factor f: the frames
``offset, offset + f, offset + 2f, ...`` with effective repetition time f x TR.
The start offset is drawn from a seeded RNG keyed by the run and the factor, so
it does not depend on which other runs are in the batch of files.

TAPE (temporal adaptive patch embedding) cuts every sample into patches that
span the same duration tau: patch size k = round(tau / TR_eff) frames, number of
patches n = ceil(T_eff / k), padded to ``max_patches`` with a mask. Variants
longer than ``max_patches`` patches are cut; variants shorter than one patch
are dropped and counted.

Only the plan is written here (one table row per sample); the frames are taken
from the source file when the packed store is written (:mod:`bh_models.store.shards`),
so no per-variant copy of the data ever lands on disk.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import read_json, sidecar_path, write_json
from bh_models.core.storeformat import SAMPLE_COLUMNS, parse_entities, run_label, write_samples_table

__desc__ = (
    "Each parcel time series was augmented by temporal downsampling: for every "
    "factor f in {factors}, every f-th frame was kept from a seeded random start "
    "offset, giving an effective repetition time of f x TR. Following TAPE "
    "(Dong et al. 2025), each sample was cut into patches of k = round(tau / TR) "
    "frames with tau = {tau} s, giving n = ceil(T / k) patches, padded to "
    "{max_patches} patches with a padding mask; longer samples were truncated to "
    "{max_patches} patches and samples shorter than one patch were discarded."
)

#: The paper's patch duration: 48 frames of UK Biobank's TR of 0.735 s.
DEFAULT_TAU = 35.28
DEFAULT_MAX_PATCHES = 18

def derived_rng(seed: int, *keys: object) -> np.random.Generator:
    """A random generator fixed by ``seed`` and a tuple of labels.

    Hashing the labels (not Python's salted ``hash``) keeps every draw stable
    across processes and independent of the order in which items are visited.
    """
    digest = hashlib.sha256("\x1f".join(map(str, keys)).encode("utf-8")).digest()
    words = np.frombuffer(digest[:16], dtype="<u4").tolist()
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


def patch_size(*, tr: float, tau: float = DEFAULT_TAU) -> int:
    """TAPE patch size k = round(tau / TR) frames (halves round up), at least 1.

    Parameters
    ----------
    tr : float
        Effective repetition time in seconds.
    tau : float
        Patch duration in seconds.

    Returns
    -------
    int
        Frames per patch.
    """
    if not (tr > 0 and tau > 0):
        raise BHConfigError("augment.tau", f"tau={tau} and TR={tr} must be positive", "set positive values")
    # A tiny tolerance so that 35.28 / 0.735 = 47.99999... still reads as 48.
    return max(1, int(math.floor(tau / tr + 0.5 + 1e-9)))


def plan_patches(*, n_frames: int, k: int, max_patches: int) -> tuple[int, int, bool]:
    """Patch plan of one sample.

    Parameters
    ----------
    n_frames : int
        Frames of the (downsampled) sample.
    k : int
        Frames per patch.
    max_patches : int
        Patches the model sees at most.

    Returns
    -------
    kept_frames : int
        Frames kept after cutting to ``max_patches * k``.
    n_patches : int
        ``ceil(kept_frames / k)``; 0 means the sample is shorter than one patch.
    cut : bool
        True when frames were cut.
    """
    if n_frames < k:
        return n_frames, 0, False
    kept = min(n_frames, max_patches * k)
    return kept, -(-kept // k), kept < n_frames


def _run_metadata(path: Path) -> tuple[float, int]:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise BHInputError(sidecar, "JSON sidecar of the parcel time series is missing",
                           "rerun the functional stage for this run")
    meta = read_json(sidecar)
    # The TSV's rows: NumberOfRows when frames were censored (the functional step writes both).
    key = "NumberOfRows" if "NumberOfRows" in meta else "NumberOfVolumes"
    tr, n_vols = meta.get("RepetitionTime"), meta.get(key)
    if not isinstance(tr, (int, float)) or not tr > 0:
        raise BHInputError(sidecar, f"RepetitionTime is {tr!r}", "write a positive RepetitionTime in seconds")
    if not isinstance(n_vols, int) or n_vols < 1:
        raise BHInputError(sidecar, f"{key} is {n_vols!r}", "write the number of rows of the TSV")
    return float(tr), n_vols


def sample_id(*, dataset: str, source_file: str, factor: int) -> str:
    """Stable identifier of one variant: dataset, every BIDS entity that tells the run apart, factor.

    ``ses``, ``task``, ``acq``, ``ce``, ``rec``, ``dir``, ``run``, ``echo``, ``part``,
    ``chunk`` in BIDS order (:data:`bh_models.core.storeformat.RUN_ENTITIES`), so
    ``dir-LR``/``dir-RL`` pairs stay two samples.
    """
    ent = parse_entities(source_file)
    label = run_label(source_file)
    return f"{dataset}_sub-{ent['subject']}{'_' + label if label else ''}_factor-{factor}"


def plan_samples(
    *,
    runs: Sequence[tuple[str, float, int]],
    dataset: str,
    tr_factors: Sequence[int],
    tau: float = DEFAULT_TAU,
    max_patches: int = DEFAULT_MAX_PATCHES,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Plan every downsampled variant of a set of runs (no file access).

    Parameters
    ----------
    runs : sequence of (source_file, TR, n_frames)
        File name (BIDS, carries ``sub-``/``ses-``/``run-``), repetition time in
        seconds and number of frames of each run.
    dataset : str
        Dataset name (as in config.yaml).
    tr_factors : sequence of int
        Downsampling factors, e.g. ``[1, 2, 3, 4]``.
    tau, max_patches : float, int
        TAPE patch duration (s) and padded number of patches.
    seed : int
        Seed of the start offsets.

    Returns
    -------
    samples : DataFrame
        One row per kept variant, columns :data:`SAMPLE_COLUMNS`, sorted by sample id.
    dropped : DataFrame
        Variants shorter than one patch: sample_id, source_file, n_frames, k.
    """
    factors = _check_factors(tr_factors)
    if max_patches < 1:
        raise BHConfigError("augment.max_patches", f"{max_patches} < 1", "set at least 1 patch")
    rows, dropped = [], []
    for source_file, source_tr, source_frames in runs:
        ent = parse_entities(source_file)
        if not ent["subject"]:
            raise BHInputError(source_file, "file name has no sub-<label> entity", "use BIDS file names")
        for factor in factors:
            # Key the offset on the run and factor only: adding runs never moves it.
            offset = int(derived_rng(seed, dataset, source_file, factor).integers(0, factor))
            n_frames = len(range(offset, source_frames, factor))
            tr = factor * source_tr
            k = patch_size(tr=tr, tau=tau)
            kept, n_patches, cut = plan_patches(n_frames=n_frames, k=k, max_patches=max_patches)
            sid = sample_id(dataset=dataset, source_file=source_file, factor=factor)
            if n_patches == 0:
                dropped.append({"sample_id": sid, "source_file": source_file, "n_frames": n_frames, "k": k})
                continue
            rows.append({
                "sample_id": sid, "dataset": dataset, "subject": ent["subject"],
                "session": ent["session"], "task": ent["task"], "run": ent["run"],
                "source_file": source_file, "source_tr": source_tr, "source_frames": source_frames,
                "factor": factor, "offset": offset, "tr": tr, "k": k, "n_frames": kept,
                "n_patches": n_patches, "max_patches": max_patches,
                "padded_length": max_patches * k, "cut": cut,
            })
    samples = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))
    if samples["sample_id"].duplicated().any():
        dup = samples.loc[samples["sample_id"].duplicated(), "source_file"].iloc[0]
        raise BHInputError(dup, "two runs map to the same sample id",
                           "two files of the same run were given (every BIDS entity that tells runs apart is "
                           "in the id); pass each run's series once")
    samples = samples.sort_values("sample_id", kind="stable").reset_index(drop=True)
    return samples, pd.DataFrame(dropped, columns=["sample_id", "source_file", "n_frames", "k"])


def _check_factors(tr_factors: Sequence[int]) -> list[int]:
    factors = list(tr_factors)
    if not factors or any(not isinstance(f, (int, np.integer)) or f < 1 for f in factors) \
            or len(set(factors)) != len(factors):
        raise BHConfigError("datasets.<name>.tr_factors", f"{factors!r} is not a list of distinct integers >= 1",
                            "list the downsampling factors, e.g. [1, 2, 3, 4]")
    return sorted(int(f) for f in factors)


def make_samples(
    *,
    timeseries: Sequence[Path],
    dataset: str,
    out_samples: Path,
    tr_factors: Sequence[int],
    tau: float = DEFAULT_TAU,
    max_patches: int = DEFAULT_MAX_PATCHES,
    seed: int,
    threads: int = 1,
) -> dict:
    """Step function: the samples table of one dataset.

    Reads only the JSON sidecars (RepetitionTime, NumberOfVolumes), so it costs
    milliseconds per run even for 70,000 runs.

    Parameters
    ----------
    timeseries : list of Path
        Parcel time series TSVs of one dataset (``..._timeseries.tsv`` with sidecar).
    dataset : str
        Dataset name.
    out_samples : Path
        Output TSV, one row per sample (columns :data:`SAMPLE_COLUMNS`); its JSON
        sidecar records the parameters and every dropped variant.
    tr_factors : list of int
        Downsampling factors of this dataset (config ``datasets.<name>.tr_factors``).
    tau : float
        TAPE patch duration in seconds (config ``augment.tau``).
    max_patches : int
        Padded number of patches (config ``augment.max_patches``).
    seed : int
        Seed of the start offsets.
    threads : int
        Unused (sidecar reading is I/O bound and fast).

    Returns
    -------
    dict
        ``n_runs``, ``n_samples``, ``n_dropped``, ``n_cut``.
    """
    del threads
    names = [Path(p).name for p in timeseries]
    if len(set(names)) != len(names):
        raise BHInputError(dataset, "two time series files share a file name",
                           "give every run distinct BIDS entities")
    runs = [(Path(p).name, *_run_metadata(Path(p))) for p in timeseries]
    samples, dropped = plan_samples(runs=runs, dataset=dataset, tr_factors=tr_factors, tau=tau,
                                    max_patches=max_patches, seed=seed)
    out_samples = Path(out_samples)
    write_samples_table(samples, out_samples)
    summary = {
        "n_runs": len(runs), "n_samples": int(len(samples)), "n_dropped": int(len(dropped)),
        "n_cut": int(samples["cut"].sum()),
    }
    write_json(sidecar_path(out_samples), {
        "Dataset": dataset, "TRFactors": _check_factors(tr_factors), "Tau": tau, "MaxPatches": max_patches,
        "Seed": seed, "Counts": summary, "Dropped": dropped.to_dict(orient="records"),
        "Description": __desc__.format(factors=_check_factors(tr_factors), tau=tau, max_patches=max_patches),
    })
    return summary
