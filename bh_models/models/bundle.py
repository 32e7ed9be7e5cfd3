"""Model bundles: one folder with everything needed to encode new data with the pretrained models.

A pretraining run writes its bundle into ``<results_dir>/models``; a downstream
cohort can then be encoded against that bundle, a colleague's, or one imported
from the paper's released checkpoints, without any retraining
(``model: {bundle: PATH}`` in config.yaml). Layout::

    bundle.json                  format, settings, files, pretraining data
    harmonix-f/checkpoint.pt     (+ checkpoint.json: config, steps, losses)
    harmonix-s/checkpoint.pt     (+ checkpoint.json)
    harmonizer/checkpoint.pt     (+ checkpoint.json)
    scaling.json, scaling.tsv    robust-scaling statistics of the pretraining training split
    geometry_embedding.tsv       ROI x mode eigenmode table, rows in the bundle's network order
    gradient_embedding.tsv       ROI x gradient functional-gradient table, same row order
    MODEL_CARD.md                what data, how many steps, final losses, provenance, contract
    SHA256SUMS                   sha256 of every file above (``sha256sum -c`` format)

**Normalisation contract.** Downstream series are scaled with the bundle's
``scaling.json`` (the median and IQR of the *pretraining* cohort's training
split), never with statistics of the downstream cohort, and must be cleaned and
parcellated as the bundle's ``settings`` say.

``settings`` are keyed by the config key that sets them (``atlas.networks``,
``augment.tau`` ...); a config that disagrees with a bundle is refused with both
values named (:func:`check_settings`). A setting recorded as ``null`` (e.g. in
an imported bundle whose preprocessing is not ours) is not checked.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.hashing import sha256_file
from bh_models.core.jsonio import atomic_write_text, read_json, write_json

__desc__ = (
    "The pretrained models, the robust-scaling statistics of the pretraining training split and "
    "the positional tables were written as one model bundle with a model card and a sha256 "
    "manifest; every downstream dataset was encoded against that bundle, scaled with the "
    "pretraining statistics."
)

BUNDLE_FORMAT = "bh-bundle-1"
BUNDLE_FILE = "bundle.json"
MANIFEST_FILE = "SHA256SUMS"
CARD_FILE = "MODEL_CARD.md"
SCALING_FILE = "scaling.json"
SCALING_TABLE_FILE = "scaling.tsv"
GEOMETRY_FILE = "geometry_embedding.tsv"
GRADIENTS_FILE = "gradient_embedding.tsv"
#: Model kind -> checkpoint path inside a bundle.
CHECKPOINTS = {"harmonix_f": "harmonix-f/checkpoint.pt", "harmonix_s": "harmonix-s/checkpoint.pt",
               "harmonizer": "harmonizer/checkpoint.pt"}
#: Config keys a bundle records and a downstream config must match: they change the
#: models' inputs (ROI order and count, patch size and count, T1 grid, signal units, denoising).
SETTING_KEYS = ("atlas.name", "atlas.parcels", "atlas.networks", "augment.tau", "augment.max_patches",
                "template.name", "template.resolution", "anat.tensor_grid", "func.detrend", "func.high_pass",
                "func.low_pass", "func.standardize", "func.denoise", "func.gsr")

NORMALISATION_CONTRACT = (
    "Downstream parcel series are cleaned and parcellated with this bundle's settings, then "
    "robust-scaled with this bundle's scaling.json: per ROI, minus the median and divided by the "
    "interquartile range of the pretraining cohort's training-split subjects' temporal means "
    "(ROIs listed under floored_rois keep their cleaned units). Statistics of the downstream "
    "cohort itself are never used, so a downstream subject is encoded the same whatever cohort "
    "it arrives with. T1 tensors are z-scored within each subject's brain mask on the bundle's tensor grid."
)


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


def settings_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SETTING_KEYS` values of a (default-filled) config, lists as lists."""
    return {key: (list(v) if isinstance(v := _lookup(config, key), (list, tuple)) else v) for key in SETTING_KEYS}


def check_settings(*, bundle: Mapping[str, Any], expected: Mapping[str, Any], bundle_path: Path | str) -> None:
    """Refuse a bundle whose recorded settings differ from the config's.

    Raises
    ------
    BHConfigError
        Naming the config key, this config's value and the bundle's.
    """
    recorded = bundle.get("settings", {})
    for key in SETTING_KEYS:
        theirs, ours = recorded.get(key), expected.get(key)
        if theirs is None or ours is None:
            continue
        if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != ours:
            raise BHConfigError(
                key, f"is {ours!r} in this config, but the model bundle {bundle_path} was trained with {theirs!r}",
                f"set {key}: {theirs!r} (and rerun the preprocessing it changes), or use a bundle trained "
                f"with {key}: {ours!r}",
            )


def read_bundle(path: Path | str) -> dict[str, Any]:
    """``bundle.json`` of a bundle folder (or of the file itself), checked for format."""
    path = Path(path)
    file = path / BUNDLE_FILE if path.is_dir() or path.suffix != ".json" else path
    if not file.is_file():
        raise BHConfigError("model.bundle", f"{file} not found: {path} is not a model bundle",
                            "point model.bundle at the folder holding bundle.json (e.g. results/models)")
    bundle = read_json(file)
    if bundle.get("format") != BUNDLE_FORMAT:
        raise BHInputError(file, f"format {bundle.get('format')!r} is not {BUNDLE_FORMAT}",
                           "rebuild the bundle with this version of the pipeline")
    return bundle


def manifest_entries(path: Path) -> dict[str, str]:
    """relative path -> sha256, from a bundle's ``SHA256SUMS``."""
    entries = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise BHInputError(path, f"line {number} is not '<sha256>  <file>'", "rebuild the bundle's manifest")
        entries[name] = digest
    return entries


def verify_bundle(path: Path | str) -> list[str]:
    """Problems of a bundle folder: missing manifest or file, or a file whose sha256 changed.

    Returns
    -------
    list of str
        Empty when every file in ``SHA256SUMS`` is present with its recorded
        hash and every file the bundle needs is listed.
    """
    root = Path(path)
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        return [f"{manifest}: missing (not a bundle, or an unfinished one)"]
    entries = manifest_entries(manifest)
    problems = [f"{name}: required by every bundle but not in {MANIFEST_FILE}"
                for name in (BUNDLE_FILE, CARD_FILE, SCALING_FILE, GEOMETRY_FILE, GRADIENTS_FILE,
                             *CHECKPOINTS.values())
                if name not in entries]
    for name, digest in entries.items():
        file = root / name
        if not file.is_file():
            problems.append(f"{name}: listed in {MANIFEST_FILE} but missing")
        elif sha256_file(path=file) != digest:
            problems.append(f"{name}: sha256 differs from {MANIFEST_FILE} (the file was changed after the "
                            "bundle was written)")
    return problems


def require_valid_bundle(path: Path | str) -> dict[str, Any]:
    """:func:`read_bundle` after :func:`verify_bundle` found no problem."""
    problems = verify_bundle(path)
    if problems:
        raise BHInputError(Path(path) / MANIFEST_FILE, "the bundle does not verify: " + "; ".join(problems[:3]),
                           f"rebuild or re-copy the bundle; `bh bundle verify {path}` lists every problem")
    return read_bundle(path)


def write_manifest(root: Path, names: Sequence[str]) -> Path:
    """Write ``SHA256SUMS`` for ``names`` (paths relative to ``root``), sorted."""
    lines = [f"{sha256_file(path=root / name)}  {name}" for name in sorted(names)]
    manifest = root / MANIFEST_FILE
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return manifest


def _copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def _split_counts(splits: Sequence[Path]) -> pd.DataFrame:
    frames = [pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in splits]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["dataset", "split"])
    return table.groupby(["dataset", "split"]).size().unstack(fill_value=0)


def _sample_counts(samples: Sequence[Path]) -> pd.DataFrame:
    rows = []
    for path in samples:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        for dataset, group in table.groupby("dataset"):
            rows.append({"dataset": dataset, "runs": group["source_file"].nunique(), "samples": len(group),
                         "tr_s": ", ".join(sorted(set(group["source_tr"]), key=float))})
    return pd.DataFrame(rows, columns=["dataset", "runs", "samples", "tr_s"]).set_index("dataset")


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def model_card(*, bundle: Mapping[str, Any], sidecars: Mapping[str, Mapping[str, Any]], splits: pd.DataFrame,
               samples: pd.DataFrame) -> str:
    """The bundle's ``MODEL_CARD.md``: data, training, losses, settings, provenance and contract."""
    data = splits.join(samples, how="outer").reset_index().rename(columns={"index": "dataset"})
    training = pd.DataFrame([{
        "model": kind, "checkpoint": CHECKPOINTS[kind], "steps": card.get("Steps"),
        "batch": card.get("TrainConfig", {}).get("batch_size"), "lr": card.get("TrainConfig", {}).get("lr"),
        "first-3 loss": f"{card.get('InitialLoss', float('nan')):.4g}",
        "final loss": f"{card.get('FinalLoss', float('nan')):.4g}",
        "loss drop": f"{100 * card.get('LossDrop', float('nan')):.1f} %",
        "parameters": card.get("TrainableParameters"),
    } for kind, card in sidecars.items()])
    settings = pd.DataFrame([{"config key": k, "value": v} for k, v in bundle["settings"].items()])
    provenance = bundle.get("provenance", {})
    code = provenance.get("code", {})
    return "\n\n".join([
        "# Model card: Brain Harmony bundle",
        "Three pretrained models (harmonix-F: fMRI encoder, JEPA with TAPE and geometric positions; "
        "harmonix-S: T1 encoder, 3-D MAE; Harmonizer: brain hub tokens fused from both) with the "
        "statistics and tables needed to encode new data. Use it with `model: {bundle: <this folder>}` "
        "in config.yaml; check it with `bh bundle verify <this folder>`.",
        "## Pretraining data\n\nSubjects per split (subject-level splits; only `train` was trained on) and "
        "fMRI runs and samples (runs x TR-downsampling factors):\n\n" + _markdown_table(data),
        "## Training\n\nLoss drop = 1 - mean(last 3 step losses) / mean(first 3).\n\n" + _markdown_table(training),
        "## Settings the inputs must match\n\nA config that disagrees with any of these is refused.\n\n"
        + _markdown_table(settings),
        "## Normalisation contract\n\n" + NORMALISATION_CONTRACT,
        "## Provenance\n\n" + "\n".join([
            f"- code: bh_models {provenance.get('version', '?')}, commit "
            f"{code.get('commit') or 'unknown'}{' (uncommitted changes)' if code.get('dirty') else ''}",
            f"- seed: {provenance.get('seed')}",
            "- per-file records: `<results_dir>/provenance/` of the run that wrote this bundle; "
            f"file hashes: `{MANIFEST_FILE}`",
        ]),
    ]) + "\n"


def make_bundle(
    *,
    fmri_checkpoint: Path,
    t1_checkpoint: Path,
    harmonizer_checkpoint: Path,
    scaling: Path,
    scaling_table: Path,
    geometry: Path,
    gradients: Path,
    splits: Sequence[Path],
    samples: Sequence[Path],
    out_bundle: Path,
    out_scaling: Path,
    out_scaling_table: Path,
    out_geometry: Path,
    out_gradients: Path,
    out_card: Path,
    out_manifest: Path,
    settings: Mapping[str, Any],
    seed: int,
    threads: int = 1,
) -> dict[str, Any]:
    """Step function: gather a pretraining run's models into a bundle folder.

    Parameters
    ----------
    fmri_checkpoint, t1_checkpoint, harmonizer_checkpoint : Path
        Final checkpoints, already inside the bundle folder (``out_bundle``'s
        parent) at :data:`CHECKPOINTS`; their JSON sidecars are read for the card.
    scaling, scaling_table : Path
        The store's robust-scaling statistics (copied in).
    geometry : Path
        The ROI x mode eigenmode table harmonix-F was trained with (copied in).
    gradients : Path
        The ROI x gradient functional-gradient table harmonix-F was trained with (copied in).
    splits, samples : sequence of Path
        Split and samples tables of the pretraining datasets (counts for the card).
    out_bundle, out_scaling, out_scaling_table, out_geometry, out_gradients, out_card, out_manifest : Path
        ``bundle.json``, the copies, ``MODEL_CARD.md`` and ``SHA256SUMS``, in one folder.
    settings : mapping
        :func:`settings_from_config` of the run's config.
    seed : int
        The run's seed (recorded).
    threads : int
        Unused.
    """
    del threads
    from bh_models import __version__
    from bh_models.core.provenance import code_version

    root = Path(out_bundle).parent
    for kind, checkpoint in zip(CHECKPOINTS, (fmri_checkpoint, t1_checkpoint, harmonizer_checkpoint)):
        if Path(checkpoint).resolve() != (root / CHECKPOINTS[kind]).resolve():
            raise BHInputError(checkpoint, f"is not at {CHECKPOINTS[kind]} inside the bundle folder {root}",
                               "write the pretraining checkpoints into the bundle folder")
    for target, name in ((out_scaling, SCALING_FILE), (out_scaling_table, SCALING_TABLE_FILE),
                         (out_geometry, GEOMETRY_FILE), (out_gradients, GRADIENTS_FILE), (out_card, CARD_FILE),
                         (out_manifest, MANIFEST_FILE)):
        if Path(target) != root / name:
            raise BHInputError(target, f"is not {name} in the bundle folder {root}", "fix the rule's outputs")
    _copy(Path(scaling), Path(out_scaling))
    _copy(Path(scaling_table), Path(out_scaling_table))
    _copy(Path(geometry), Path(out_geometry))
    _copy(Path(gradients), Path(out_gradients))
    sidecars = {kind: read_json((root / path).with_suffix(".json")) for kind, path in CHECKPOINTS.items()}
    split_counts, sample_counts = _split_counts(splits), _sample_counts(samples)
    bundle = {
        "format": BUNDLE_FORMAT,
        "Description": "Brain Harmony model bundle: pretrained harmonix-F, harmonix-S and Harmonizer with "
                       "the statistics and positional tables needed to encode new data",
        "settings": dict(settings),
        "checkpoints": dict(CHECKPOINTS),
        "scaling": SCALING_FILE,
        "geometry": GEOMETRY_FILE,
        "gradients": GRADIENTS_FILE,
        "model_configs": {kind: card.get("ModelConfig", {}) for kind, card in sidecars.items()},
        "pretraining": {
            "datasets": sorted(split_counts.index.tolist()),
            "subjects_per_split": {d: {s: int(n) for s, n in row.items()} for d, row in split_counts.iterrows()},
            "scaling_subjects": read_json(Path(scaling)).get("n_subjects"),
        },
        "normalisation_contract": NORMALISATION_CONTRACT,
        "provenance": {"code": code_version(), "version": __version__, "seed": seed,
                       "made_by": "bh_models.models.bundle:make_bundle"},
    }
    write_json(Path(out_bundle), bundle)
    atomic_write_text(Path(out_card), model_card(bundle=bundle, sidecars=sidecars, splits=split_counts,
                                                  samples=sample_counts))
    listed = [BUNDLE_FILE, CARD_FILE, SCALING_FILE, SCALING_TABLE_FILE, GEOMETRY_FILE, GRADIENTS_FILE,
              *CHECKPOINTS.values(), *(str(Path(p).with_suffix(".json")) for p in CHECKPOINTS.values())]
    write_manifest(root, listed)
    return {"bundle": str(root), "files": len(listed)}


def bundle_paths(root: Path | str) -> dict[str, str]:
    """Paths of a bundle's files, keyed as the embedding rules name their inputs."""
    root = Path(root)
    return {"bundle": str(root / BUNDLE_FILE), "dep_manifest": str(root / MANIFEST_FILE),
            "dep_scaling": str(root / SCALING_FILE), "dep_geometry": str(root / GEOMETRY_FILE),
            "dep_gradients": str(root / GRADIENTS_FILE),
            **{f"dep_{kind}": str(root / path) for kind, path in CHECKPOINTS.items()}}


def main(argv: list[str] | None = None) -> int:
    """``bh bundle verify PATH``: check every file of a bundle against its manifest."""
    parser = argparse.ArgumentParser(prog="bh bundle", description="Model bundle tools")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check a bundle's files against its SHA256SUMS")
    verify.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    problems = verify_bundle(args.path)
    if problems:
        for problem in problems:
            print(f"{args.path}: {problem}", file=sys.stderr)
        print(f"{args.path}: {len(problems)} problem(s); the bundle must not be used as it is", file=sys.stderr)
        return 1
    bundle = read_bundle(args.path)
    n_files = len(manifest_entries(Path(args.path) / MANIFEST_FILE))
    print(f"{args.path}: OK ({n_files} files match {MANIFEST_FILE}; pretrained on "
          f"{', '.join(bundle.get('pretraining', {}).get('datasets', [])) or 'unrecorded data'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
