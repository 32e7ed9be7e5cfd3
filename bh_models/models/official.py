"""``bh import-official``: the paper's released checkpoints as a model bundle of this workflow.

The authors (hzlab/Brain-Harmony, CC BY-NC-SA 4.0) release three checkpoint files
and two positional tables. This module reads the user's copies (nothing is
downloaded, nothing of the release ships here) and writes a bundle the workflow
uses directly (``model: {bundle: OUT}``):

``harmonix-f/model.pth``
    A flat state dict of the JEPA training wrapper: ``encoder.*`` (online),
    ``encoder_ema.*`` (the target encoder, used downstream) and ``decoder.*`` (the
    predictor, whose ``predictor_pos_embed.*`` is the encoder's shared positional
    module). Mapped onto :class:`~bh_models.models.nn.harmonix_f.HarmonixF`'s
    ``encoder``, ``target_encoder`` and ``predictor``.
``harmonix-s/model.pth``
    ``{"model": state dict}`` of the 3-D MAE: encoder and decoder, mapped onto
    :class:`~bh_models.models.nn.harmonix_s.HarmonixS` (fixed positional tables copied).
``harmonizer/model.pth``
    ``{"model": state dict}`` of ``OneTokRegViT``, whose names
    :class:`~bh_models.models.nn.harmonizer.Harmonizer` shares.
``schaefer400_roi_eigenmodes.csv``, ``gradient_mapping_400.csv``
    The 400 x 200 eigenmode and 400 x 30 gradient tables (a header row and a label
    column in the first; bare numbers in the second), written into the bundle as its
    ``geometry_embedding.tsv`` and ``gradient_embedding.tsv`` (rows named in the
    Schaefer-400 17-network order, which the release's loaders read) and into the
    harmonix-F checkpoint's buffers.

Every official tensor is either copied into a parameter or buffer of ours (after
its shape is checked, and reshaped where the layout differs: the Conv2d TAPE kernel
``(D, 1, 1, k0)`` becomes ``(D, k0)``, a ``(1, 1 + N, D)`` table loses its zero
class row) or, for the fixed sine-cosine tables ours recompute (harmonix-F's
``emb_h_*``, the Harmonizer's ``pos_embed`` and ``decoder_pos_embed``) and for the
predictor's copy of the shared positional module, checked equal to what ours
computes. Every parameter and buffer of ours must be filled. Anything else fails,
with every missing, unexpected or misshapen key named.

The bundle's settings are the paper's: Schaefer-400 in the 17-network order, tau
35.28 s, 18 patches, a 160 x 192 x 160 T1 grid; the release's preprocessing and
normalisation statistics are unknown, so those settings are null (not checked) and
the bundle's scaling is the identity (the release's downstream loader applies no
scaling either).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from bh_models.core.errors import BHInputError
from bh_models.core.jsonio import atomic_write_text, write_json
from bh_models.core.templates import atlas_labels
from bh_models.models.bundle import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    CARD_FILE,
    CHECKPOINTS,
    GEOMETRY_FILE,
    GRADIENTS_FILE,
    NORMALISATION_CONTRACT,
    SCALING_FILE,
    SCALING_TABLE_FILE,
    SETTING_KEYS,
    write_manifest,
)
from bh_models.models.nn.blocks import sincos_1d
from bh_models.models.nn.harmonix_f import TABLE_PREFIXES
from bh_models.models.nn.configs import config_to_dict, model_config
from bh_models.models.nn.harmonix_f import HarmonixF
from bh_models.models.nn.harmonix_s import HarmonixS
from bh_models.models.nn.harmonizer import Harmonizer, fixed_positions
from bh_models.models.train import CHECKPOINT_FORMAT, save_checkpoint

__desc__ = (
    "The authors' released harmonix-F, harmonix-S and Harmonizer checkpoints and positional tables were "
    "converted into a model bundle, every tensor mapped and shape-checked."
)

#: The paper's settings (config keys of SETTING_KEYS); None = unknown, not checked.
PAPER_SETTINGS: dict[str, Any] = {
    "atlas.name": "Schaefer2018", "atlas.parcels": 400, "atlas.networks": 17, "augment.tau": 35.28,
    "augment.max_patches": 18, "template.name": None, "template.resolution": None,
    "anat.tensor_grid": [160, 192, 160], "func.detrend": None, "func.high_pass": None, "func.low_pass": None,
    "func.standardize": None, "func.denoise": None, "func.gsr": None,
}
N_ROIS, N_PATCHES = 400, 18
#: Tolerance of the checks of the release's fixed tables against ours (float32 sin-cos).
TABLE_ATOL = 1e-5


@dataclass
class Mapped:
    """The conversion of one official state dict."""

    ours: dict[str, Tensor]  # our key -> tensor
    checked: list[str]  # official keys verified against our own computation
    problems: list[str]


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in tensor.shape)


def _max_index(keys: Any, prefix: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    if not found:
        raise BHInputError(prefix, f"no '{prefix}<i>.' keys in the checkpoint", "pass the release's checkpoint file")
    return max(found) + 1


Rule = tuple[str, str, Callable[[Tensor], Tensor] | None]  # official regex, our template, transform


def convert(official: Mapping[str, Tensor], *, rules: list[Rule], checks: Mapping[str, Callable[[], Tensor]],
            model: torch.nn.Module, name: str) -> Mapped:
    """Map an official state dict onto ``model``'s (module doc); every problem is collected, none raised.

    Parameters
    ----------
    official : mapping
        The release's state dict.
    rules : list of (regex, template, transform)
        The first full match of an official key gives our key (``\\1``-style groups) and a
        transform of the tensor (None = as is).
    checks : mapping
        Official key -> a function computing the tensor it must equal (fixed tables).
    model : Module
        A freshly built model of ours; its state dict gives the keys and shapes to fill.
    name : str
        ``harmonix-F`` ..., for the messages.
    """
    expected = {key: _shape(value) for key, value in model.state_dict().items()}
    ours, checked, problems = {}, [], []
    for key, tensor in official.items():
        if key in checks:
            reference = checks[key]()
            if _shape(tensor) != _shape(reference):
                problems.append(f"{name}: {key} has shape {_shape(tensor)}, the release's layout gives "
                                f"{_shape(reference)}")
            elif not torch.allclose(tensor.float(), reference.float(), atol=TABLE_ATOL, rtol=0):
                diff = float((tensor.float() - reference.float()).abs().max())
                problems.append(f"{name}: {key} differs from the table ours computes (max |diff| {diff:.3g})")
            else:
                checked.append(key)
            continue
        for pattern, template, transform in rules:
            match = re.fullmatch(pattern, key)
            if match:
                target = match.expand(template)
                value = transform(tensor) if transform is not None else tensor
                if target not in expected:
                    problems.append(f"{name}: unexpected key {key} (shape {_shape(tensor)}): our model has no {target}")
                elif _shape(value) != expected[target]:
                    problems.append(f"{name}: {key} has shape {_shape(tensor)}, ours ({target}) needs {expected[target]}")
                elif target in ours:
                    problems.append(f"{name}: {key} fills {target} a second time")
                else:
                    ours[target] = value.detach().float().clone()
                break
        else:
            problems.append(f"{name}: unexpected key {key} (shape {_shape(tensor)})")
    for key in sorted(set(expected) - set(ours)):
        problems.append(f"{name}: missing key: nothing in the release fills our {key} {expected[key]}")
    return Mapped(ours=ours, checked=checked, problems=problems)


# ----------------------------------------------------------------------------- the three models


def _time_table(width: int) -> Tensor:
    """The release's ``emb_h_*``: sin-cos of the patch index of every (ROI, patch) token, ROI-major."""
    return sincos_1d(dim=width, positions=torch.arange(N_PATCHES)).repeat(N_ROIS, 1)  # (R * P, width)


def _unwrap(payload: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(payload, Mapping) and "model" in payload and isinstance(payload["model"], Mapping):
        payload = payload["model"]
    if not isinstance(payload, Mapping) or not payload or not all(isinstance(v, Tensor) for v in payload.values()):
        raise BHInputError(path, "is not a state dict of tensors (nor {'model': state dict})",
                           "pass the release's model.pth")
    return dict(payload)


def harmonix_f_from_official(official: Mapping[str, Tensor], *, eigenmodes: Tensor, gradients: Tensor
                             ) -> tuple[HarmonixF, Mapped]:
    """Our harmonix-F filled from the release's flat ``encoder/encoder_ema/decoder`` state dict."""
    weight = official.get("encoder_ema.patch_embed.proj.weight")
    predictor = official.get("decoder.predictor_embed.weight")
    if weight is None or predictor is None:
        raise BHInputError("harmonix-F", "no encoder_ema.patch_embed.proj.weight or decoder.predictor_embed.weight",
                           "pass the release's harmonix-f/model.pth")
    width, base_patch, predictor_width = int(weight.shape[0]), int(weight.shape[-1]), int(predictor.shape[0])
    config = model_config(model="harmonix_f", size="base", overrides={
        "n_rois": N_ROIS, "geometry_dim": int(eigenmodes.shape[1]), "gradient_dim": int(gradients.shape[1]),
        "base_patch": base_patch, "embed_dim": width, "depth": _max_index(official, "encoder_ema.blocks."),
        "predictor_dim": predictor_width, "predictor_depth": _max_index(official, "decoder.predictor_blocks."),
    })
    model = HarmonixF(config, eigenmodes, gradients)
    rules: list[Rule] = []
    checks: dict[str, Callable[[], Tensor]] = {}
    for theirs, ours in (("encoder", "encoder"), ("encoder_ema", "target_encoder")):
        rules += [
            (rf"{theirs}\.patch_embed\.proj\.weight", f"{ours}.tape.weight", lambda t: t.reshape(t.shape[0], -1)),
            (rf"{theirs}\.patch_embed\.proj\.bias", f"{ours}.tape.bias", None),
            (rf"{theirs}\.pos_embed\.(geo_harm_proj|grad_proj|decoder_pos_embed_proj)\.(weight|bias)",
             rf"{ours}.pos_embed.\1.\2", None),
            (rf"{theirs}\.(blocks\.\d+\..+|norm\.(?:weight|bias))", rf"{ours}.\1", None),
        ]
        checks[f"{theirs}.pos_embed.emb_h_encoder"] = lambda: _time_table(width // 2)
        checks[f"{theirs}.pos_embed.emb_h_decoder"] = lambda: _time_table(predictor_width // 2)
    rules += [
        (r"decoder\.(predictor_embed\.(?:weight|bias)|mask_token|predictor_blocks\.\d+\..+|"
         r"predictor_norm\.(?:weight|bias)|predictor_proj\.(?:weight|bias))", r"predictor.\1", None),
    ]
    for key in official:  # the predictor's positional module is the online encoder's (one shared object)
        if key.startswith("decoder.predictor_pos_embed."):
            twin = "encoder.pos_embed." + key.removeprefix("decoder.predictor_pos_embed.")
            if twin in checks:
                checks[key] = checks[twin]
            elif twin in official:
                checks[key] = (lambda twin=twin: official[twin])
    mapped = convert(official, rules=rules, checks=checks, model=model, name="harmonix-F")
    # Our buffers of the positional tables come from the CSVs, not from the checkpoint.
    tables = {f"{prefix}.pos_embed.{table}": model.state_dict()[f"{prefix}.pos_embed.{table}"]
              for prefix in ("encoder", "target_encoder") for table in ("eigenmodes", "gradients")}
    mapped.ours.update(tables)
    mapped.problems = [p for p in mapped.problems if not any(key in p for key in tables)]
    return model, mapped


def harmonix_s_from_official(official: Mapping[str, Tensor]) -> tuple[HarmonixS, Mapped]:
    """Our harmonix-S (3-D MAE, 160 x 192 x 160) filled from the release's ``{"model": ...}`` state dict."""
    weight = official.get("patch_embed.proj.weight")
    if weight is None:
        raise BHInputError("harmonix-S", "no patch_embed.proj.weight", "pass the release's harmonix-s/model.pth")
    overrides = {"img_size": (160, 192, 160), "patch_size": int(weight.shape[-1]), "embed_dim": int(weight.shape[0]),
                 "depth": _max_index(official, "blocks.")}
    if "decoder_embed.weight" in official:
        overrides.update(decoder_dim=int(official["decoder_embed.weight"].shape[0]),
                         decoder_depth=_max_index(official, "decoder_blocks."))
    model = HarmonixS(model_config(model="harmonix_s", size="base", overrides=overrides))

    def without_cls_row(t: Tensor) -> Tensor:
        return t[0, 1:] if t.ndim == 3 and bool((t[0, 0] == 0).all()) else t

    rules: list[Rule] = [
        (r"cls_token|mask_token|decoder_embed\.(?:weight|bias)|decoder_pred\.(?:weight|bias)", r"\g<0>", None),
        (r"pos_embed|decoder_pos_embed", r"\g<0>", without_cls_row),
        (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1", None),
        (r"(blocks\.\d+\..+|norm\.(?:weight|bias))", r"encoder.\1", None),
        (r"decoder_(blocks\.\d+\..+|norm\.(?:weight|bias))", r"decoder.\1", None),
    ]
    return model, convert(official, rules=rules, checks={}, model=model, name="harmonix-S")


def harmonizer_from_official(official: Mapping[str, Tensor]) -> tuple[Harmonizer, Mapped]:
    """Our Harmonizer filled from the release's ``OneTokRegViT`` state dict (same names)."""
    latent = official.get("latent_tokens", official.get("enc_latent_token_positional_embedding"))
    if latent is None or "pos_embed" not in official:
        raise BHInputError("harmonizer", "no latent_tokens or pos_embed", "pass the release's harmonizer/model.pth")
    width = int(latent.shape[1])
    n_tokens = int(official["pos_embed"].shape[1]) - 1
    if n_tokens != N_ROIS * N_PATCHES + 1200:
        raise BHInputError("harmonizer", f"pos_embed covers {n_tokens} tokens, not 400 x 18 + 1200",
                           "pass the release's harmonizer/model.pth")
    decoder_width = int(official["decoder_embed.weight"].shape[0]) if "decoder_embed.weight" in official else 512
    config = model_config(model="harmonizer", size="base", overrides={
        "dim_s": width, "dim_f": width, "embed_dim": width, "n_hub": int(latent.shape[0]),
        "n_rois": N_ROIS, "n_patches": N_PATCHES, "s_grid": (10, 12, 10), "depth": _max_index(official, "blocks."),
        "decoder_dim": decoder_width, "decoder_depth": _max_index(official, "decoder_blocks."),
    })
    model = Harmonizer(config)
    rules: list[Rule] = [(r".+", r"\g<0>", None)]  # the same names
    checks = {"pos_embed": lambda: fixed_positions(n_tokens=n_tokens, dim=width)[None],
              "decoder_pos_embed": lambda: fixed_positions(n_tokens=n_tokens, dim=decoder_width)[None]}
    return model, convert(official, rules=rules, checks=checks, model=model, name="harmonizer")


# ----------------------------------------------------------------------------- files


def read_eigenmode_csv(path: Path) -> np.ndarray:
    """The release's eigenmode table: a header row, a label column, then 400 x 200 numbers."""
    table = pd.read_csv(path, header=None)
    values = table.iloc[1:, 1:].to_numpy(dtype=np.float64)
    if values.shape[0] != N_ROIS or not np.isfinite(values).all():
        raise BHInputError(path, f"expected 400 rows of numbers after a header row and a label column, got "
                           f"{values.shape}", "pass brainharmony_pos_embed/schaefer400_roi_eigenmodes.csv")
    return values


def read_gradient_csv(path: Path) -> np.ndarray:
    """The release's gradient table: 400 x 30 numbers, no header, no labels."""
    values = pd.read_csv(path, header=None).to_numpy(dtype=np.float64)
    if values.shape[0] != N_ROIS or not np.isfinite(values).all():
        raise BHInputError(path, f"expected 400 rows of numbers, got {values.shape}",
                           "pass brainharmony_pos_embed/gradient_mapping_400.csv")
    return values


def _load(path: Path) -> Any:
    """``torch.load`` with the release's pickled extras (an argparse Namespace) allowed, nothing else."""
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, "not found", "pass the path of your copy of the released checkpoint")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def mode_columns(n: int) -> list[str]:
    """``mode_001`` .. as the geometry stage names them."""
    width = max(3, len(str(n)))
    return [f"{TABLE_PREFIXES['eigenmodes']}{i:0{width}d}" for i in range(1, n + 1)]


def _roi_table(values: np.ndarray, columns: list[str]) -> str:
    table = pd.DataFrame(values, columns=columns)
    table.insert(0, "name", atlas_labels(17)["name"].to_numpy())
    return table.to_csv(sep="\t", index=False, float_format="%.10g", lineterminator="\n")


def _write_model(root: Path, kind: str, model: torch.nn.Module, mapped: Mapped, source: Path) -> None:
    config = model.config
    path = root / CHECKPOINTS[kind]
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model": mapped.ours,
                           "config": {"model": config_to_dict(config), "train": None}, "step": 0,
                           "source": "imported from the authors' release"})
    write_json(path.with_suffix(".json"), {
        "Description": f"{kind} imported from the authors' released checkpoint (bh import-official)",
        "ModelConfig": config_to_dict(config), "Source": source.name, "OfficialKeysChecked": sorted(mapped.checked),
        "TrainableParameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
    })


def import_official(*, fmri: Path, t1: Path, harmonizer: Path, eigenmodes: Path, gradients: Path, out: Path) -> dict:
    """Convert the release's three checkpoints and two tables into a bundle folder ``out`` (module doc).

    Raises
    ------
    BHInputError
        Naming every missing, unexpected or misshapen key, or a table that differs.
    """
    out = Path(out)
    eigen_values, gradient_values = read_eigenmode_csv(Path(eigenmodes)), read_gradient_csv(Path(gradients))
    fmri_model, fmri_mapped = harmonix_f_from_official(
        _unwrap(_load(fmri), Path(fmri)), eigenmodes=torch.from_numpy(eigen_values).float(),
        gradients=torch.from_numpy(gradient_values).float())
    t1_model, t1_mapped = harmonix_s_from_official(_unwrap(_load(t1), Path(t1)))
    hub_model, hub_mapped = harmonizer_from_official(_unwrap(_load(harmonizer), Path(harmonizer)))
    problems = fmri_mapped.problems + t1_mapped.problems + hub_mapped.problems
    if problems:
        raise BHInputError(out, f"{len(problems)} problem(s) converting the release: " + "; ".join(problems),
                           "pass the release's files (harmonix-f, harmonix-s, harmonizer model.pth); every key "
                           "above must be mapped")
    for model, mapped in ((fmri_model, fmri_mapped), (t1_model, t1_mapped), (hub_model, hub_mapped)):
        model.load_state_dict(mapped.ours, strict=True)  # every key of ours, nothing else
    out.mkdir(parents=True, exist_ok=True)
    for kind, model, mapped, source in (("harmonix_f", fmri_model, fmri_mapped, Path(fmri)),
                                        ("harmonix_s", t1_model, t1_mapped, Path(t1)),
                                        ("harmonizer", hub_model, hub_mapped, Path(harmonizer))):
        _write_model(out, kind, model, mapped, source)
    atomic_write_text(out / GEOMETRY_FILE, _roi_table(eigen_values, mode_columns(eigen_values.shape[1])))
    atomic_write_text(out / GRADIENTS_FILE, _roi_table(
        gradient_values, [f"gradient_{i:02d}" for i in range(1, gradient_values.shape[1] + 1)]))
    names = atlas_labels(17)["name"].tolist()
    write_json(out / SCALING_FILE, {
        "Description": "identity scaling: the release ships no normalisation statistics, and its downstream "
                       "loader applies none", "rois": names, "median": [0.0] * N_ROIS, "iqr": [1.0] * N_ROIS,
        "n_subjects": None, "datasets": [], "floored_rois": []})
    atomic_write_text(out / SCALING_TABLE_FILE, "roi\tmedian\tiqr\n" + "".join(f"{n}\t0\t1\n" for n in names))
    settings = {key: PAPER_SETTINGS[key] for key in SETTING_KEYS}
    bundle = {
        "format": BUNDLE_FORMAT,
        "Description": "Brain Harmony model bundle imported from the authors' released checkpoints",
        "settings": settings,
        "settings_source": "the paper's release (bh import-official); null = unknown, not checked",
        "checkpoints": dict(CHECKPOINTS), "scaling": SCALING_FILE, "geometry": GEOMETRY_FILE,
        "gradients": GRADIENTS_FILE,
        "model_configs": {kind: config_to_dict(m.config) for kind, m in
                          (("harmonix_f", fmri_model), ("harmonix_s", t1_model), ("harmonizer", hub_model))},
        "pretraining": {"datasets": ["UK Biobank (release)"], "subjects_per_split": {}, "scaling_subjects": None},
        "normalisation_contract": NORMALISATION_CONTRACT,
        "provenance": {"made_by": "bh_models.models.official:import_official",
                       "sources": [Path(p).name for p in (fmri, t1, harmonizer, eigenmodes, gradients)]},
    }
    write_json(out / BUNDLE_FILE, bundle)
    card = "\n\n".join([
        "# Model card: Brain Harmony bundle imported from the authors' release",
        "harmonix-F, harmonix-S and the Harmonizer of Dong et al. (NeurIPS 2025), converted by `bh import-official` "
        "from the user's copy of the release (hzlab/Brain-Harmony, CC BY-NC-SA 4.0: non-commercial use).",
        "## Settings\n\n" + "\n".join(f"- `{k}`: {v!r}" for k, v in settings.items()),
        "Preprocessing and normalisation of the release are unknown (null above, not checked); the scaling is "
        "the identity. The ROI order is assumed to be the 17-network Schaefer-400 order of the release's loaders.",
        "## Normalisation contract\n\n" + NORMALISATION_CONTRACT,
    ]) + "\n"
    atomic_write_text(out / CARD_FILE, card)
    listed = [BUNDLE_FILE, CARD_FILE, SCALING_FILE, SCALING_TABLE_FILE, GEOMETRY_FILE, GRADIENTS_FILE,
              *CHECKPOINTS.values(), *(str(Path(p).with_suffix(".json")) for p in CHECKPOINTS.values())]
    write_manifest(out, listed)
    return {"bundle": str(out), "checked_tables": len(fmri_mapped.checked + t1_mapped.checked + hub_mapped.checked),
            "tensors": len(fmri_mapped.ours) + len(t1_mapped.ours) + len(hub_mapped.ours)}


def main(argv: list[str] | None = None) -> int:
    """``bh import-official --fmri F --t1 S --harmonizer H --eigenmodes E --gradients G OUT``."""
    parser = argparse.ArgumentParser(prog="bh import-official", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fmri", type=Path, required=True, help="harmonix-f/model.pth of the release")
    parser.add_argument("--t1", type=Path, required=True, help="harmonix-s/model.pth of the release")
    parser.add_argument("--harmonizer", type=Path, required=True, help="harmonizer/model.pth of the release")
    parser.add_argument("--eigenmodes", type=Path, required=True,
                        help="brainharmony_pos_embed/schaefer400_roi_eigenmodes.csv")
    parser.add_argument("--gradients", type=Path, required=True, help="brainharmony_pos_embed/gradient_mapping_400.csv")
    parser.add_argument("out", type=Path, help="bundle folder to write")
    args = parser.parse_args(argv)
    summary = import_official(fmri=args.fmri, t1=args.t1, harmonizer=args.harmonizer, eigenmodes=args.eigenmodes,
                              gradients=args.gradients, out=args.out)
    print(f"{args.out}: bundle written ({summary['tensors']} tensors, {summary['checked_tables']} fixed tables "
          f"checked); use it with model: {{bundle: {args.out}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
