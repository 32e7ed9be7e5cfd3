"""`bh import-official`: state dicts with the release's key names and shapes convert with nothing left over.

The key table below is written from our reading of the release (hzlab/Brain-Harmony:
``libs/ssl_models/jepa_flex.py``, ``libs/position_embedding.py``, ``libs/flex_transformer.py``,
``modules/harmonizer/util/t1_encoder.py``, ``modules/harmonizer/stage1_pretrain/models.py``),
with symbolic sizes: D width (768), P predictor width (384), M eigenmodes (200), G gradients (30),
K TAPE base patch (48), L / LP / LD depths (12 / 6 / 8), DD decoder width (512), S T1 patch (16),
NH hub tokens (128). The release's checkpoint files themselves could not be opened.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pandas as pd
import pytest
import torch

from bh_models.core.errors import BHInputError
from bh_models.models import official
from bh_models.models.bundle import read_bundle, verify_bundle

BASE = {"D": 768, "P": 384, "M": 200, "G": 30, "K": 48, "L": 12, "LP": 6, "LD": 8, "DD": 512, "S": 16, "NH": 128}
SMALL = {"D": 96, "P": 48, "M": 200, "G": 30, "K": 48, "L": 2, "LP": 2, "LD": 2, "DD": 64, "S": 16, "NH": 8}
ROIS, PATCHES, T1_TOKENS = 400, 18, 1200

BLOCK = [  # one pre-norm block of width W (libs/flex_transformer.Block)
    ("norm1.weight", ("W",)), ("norm1.bias", ("W",)),
    ("attn.qkv.weight", ("3W", "W")), ("attn.qkv.bias", ("3W",)),
    ("attn.proj.weight", ("W", "W")), ("attn.proj.bias", ("W",)),
    ("norm2.weight", ("W",)), ("norm2.bias", ("W",)),
    ("mlp.fc1.weight", ("4W", "W")), ("mlp.fc1.bias", ("4W",)),
    ("mlp.fc2.weight", ("W", "4W")), ("mlp.fc2.bias", ("W",)),
]
FMRI_POS = [  # BrainGradient_GeometricHarmonics_Anatomical_400_PosEmbed (use_pos_embed_decoder=True)
    ("pos_embed.emb_h_encoder", ("RP", "D/2")), ("pos_embed.emb_h_decoder", ("RP", "P/2")),
    ("pos_embed.geo_harm_proj.weight", ("D/2", "M")), ("pos_embed.geo_harm_proj.bias", ("D/2",)),
    ("pos_embed.grad_proj.weight", ("D/2", "G")), ("pos_embed.grad_proj.bias", ("D/2",)),
    ("pos_embed.decoder_pos_embed_proj.weight", ("P/2", "D/2")), ("pos_embed.decoder_pos_embed_proj.bias", ("P/2",)),
]
FMRI_ENCODER = [("patch_embed.proj.weight", ("D", 1, 1, "K")), ("patch_embed.proj.bias", ("D",)), *FMRI_POS,
                ("blocks.{i<L}", "D"), ("norm.weight", ("D",)), ("norm.bias", ("D",))]
TABLE = {
    # harmonix-f/model.pth: a flat state dict of JEPA_TS_FLEX
    "harmonix_f": [
        *[(f"{prefix}.{key}", shape) for prefix in ("encoder", "encoder_ema") for key, shape in FMRI_ENCODER],
        ("decoder.predictor_embed.weight", ("P", "D")), ("decoder.predictor_embed.bias", ("P",)),
        ("decoder.mask_token", (1, 1, "P")),
        *[("decoder.predictor_" + key, shape) for key, shape in FMRI_POS],  # the shared module, again
        ("decoder.predictor_blocks.{i<LP}", "P"),
        ("decoder.predictor_norm.weight", ("P",)), ("decoder.predictor_norm.bias", ("P",)),
        ("decoder.predictor_proj.weight", ("D", "P")), ("decoder.predictor_proj.bias", ("D",)),
    ],
    # harmonix-s/model.pth["model"]: MaskedAutoencoderViT (3-D, 160 x 192 x 160, patch 16)
    "harmonix_s": [
        ("cls_token", (1, 1, "D")), ("pos_embed", (1, "T1+1", "D")),
        ("patch_embed.proj.weight", ("D", 1, "S", "S", "S")), ("patch_embed.proj.bias", ("D",)),
        ("blocks.{i<L}", "D"), ("norm.weight", ("D",)), ("norm.bias", ("D",)),
        ("mask_token", (1, 1, "DD")), ("decoder_pos_embed", (1, "T1+1", "DD")),
        ("decoder_embed.weight", ("DD", "D")), ("decoder_embed.bias", ("DD",)),
        ("decoder_blocks.{i<LD}", "DD"), ("decoder_norm.weight", ("DD",)), ("decoder_norm.bias", ("DD",)),
        ("decoder_pred.weight", ("S^3", "DD")), ("decoder_pred.bias", ("S^3",)),
    ],
    # harmonizer/model.pth["model"]: OneTokRegViT
    "harmonizer": [
        ("cls_token", (1, 1, "D")), ("pos_embed", (1, "N+1", "D")),
        ("latent_tokens", ("NH", "D")), ("enc_latent_token_positional_embedding", ("NH", "D")),
        ("blocks.{i<L}", "D"), ("norm.weight", ("D",)), ("norm.bias", ("D",)),
        ("decoder_embed.weight", ("DD", "D")), ("decoder_embed.bias", ("DD",)),
        ("mask_token", (1, 1, "DD")), ("decoder_pos_embed", (1, "N+1", "DD")),
        ("dec_latent_token_positional_embedding", (1, "NH", "DD")),
        ("decoder_blocks.{i<LD}", "DD"), ("decoder_norm.weight", ("DD",)), ("decoder_norm.bias", ("DD",)),
        ("decoder_pred.weight", ("D", "DD")), ("decoder_pred.bias", ("D",)),
    ],
}


def size(symbol, sizes: dict, width: int | None = None) -> int:
    if isinstance(symbol, int):
        return symbol
    values = {**sizes, "W": width, "3W": 3 * (width or 0), "4W": 4 * (width or 0), "D/2": sizes["D"] // 2,
              "P/2": sizes["P"] // 2, "RP": ROIS * PATCHES, "T1+1": T1_TOKENS + 1, "S^3": sizes["S"] ** 3,
              "N+1": ROIS * PATCHES + T1_TOKENS + 1}
    return values[symbol]


def expand(model: str, sizes: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of one official file at the given sizes."""
    out = {}
    for key, shape in TABLE[model]:
        loop = re.search(r"\{i<(\w+)\}", key)
        if loop:
            width = sizes[shape]
            for i in range(sizes[loop.group(1)]):
                for leaf, leaf_shape in BLOCK:
                    out[key.replace(loop.group(0), str(i)) + "." + leaf] = tuple(size(s, sizes, width) for s in leaf_shape)
        else:
            out[key] = tuple(size(s, sizes) for s in shape)
    return out


def sincos(positions: np.ndarray, width: int) -> np.ndarray:
    """The release's 1-D table, written out: [sin | cos], omega_i = 1 / 10000^(i / (width / 2))."""
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
    out = positions.reshape(-1).astype(np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def fixed_table(key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The release's fixed tables, built as its code does (numpy meshgrid in 'xy' indexing)."""
    if key.endswith(("emb_h_encoder", "emb_h_decoder")):
        grid = np.meshgrid(np.arange(PATCHES), np.arange(ROIS))  # 'xy': grid[0][r, p] = p
        return torch.from_numpy(sincos(grid[0].reshape(-1), shape[1]))
    if key in ("pos_embed", "decoder_pos_embed") and shape[1] == ROIS * PATCHES + T1_TOKENS + 1:
        table = np.concatenate([np.zeros((1, shape[2]), np.float32), sincos(np.arange(shape[1] - 1), shape[2])])
        return torch.from_numpy(table)[None]
    if key in ("pos_embed", "decoder_pos_embed") and shape[1] == T1_TOKENS + 1:  # 3-D MAE table
        width = shape[2]
        block = 2 * (width // 6)
        w, h, d = np.meshgrid(np.arange(12), np.arange(10), np.arange(10))  # 'xy' of grid (10, 12, 10)
        # token t = a*120 + b*10 + c; with 'xy', the first grid holds the axis-1 index b.
        a, b, c = np.meshgrid(np.arange(10), np.arange(12), np.arange(10), indexing="ij")
        parts = [sincos(b, block), sincos(a, block), sincos(c, width - 2 * block)]
        table = np.concatenate([np.zeros((1, width), np.float32), np.concatenate(parts, axis=1)])
        return torch.from_numpy(table)[None]
    return None


def official_state(model: str, sizes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expand(model, sizes).items():
        table = fixed_table(key.rsplit("pos_embed.", 1)[-1] if "emb_h" in key else key, shape)
        state[key] = table if table is not None else 0.02 * torch.randn(shape, generator=generator)
    if model == "harmonix_f":  # one shared positional module: the predictor's entries are the encoder's tensors
        for key in list(state):
            if key.startswith("decoder.predictor_pos_embed."):
                state[key] = state["encoder.pos_embed." + key.removeprefix("decoder.predictor_pos_embed.")]
    return state


def write_release(root, sizes: dict) -> dict:
    """The three checkpoint files and two CSVs, laid out as the release's loaders read them."""
    root.mkdir(parents=True, exist_ok=True)
    states = {model: official_state(model, sizes, seed) for seed, model in enumerate(TABLE)}
    torch.save(states["harmonix_f"], root / "f.pth")  # flat, read with weights_only=True
    for model, name in (("harmonix_s", "s.pth"), ("harmonizer", "h.pth")):
        torch.save({"model": states[model], "epoch": 299, "args": argparse.Namespace(norm_pix_loss=True)}, root / name)
    rng = np.random.default_rng(0)
    eigen = pd.DataFrame(rng.normal(0.0, 0.005, (ROIS, sizes["M"])), columns=[f"Mode_{i + 1}" for i in range(sizes["M"])],
                         index=[f"ROI_{i + 1}" for i in range(ROIS)])
    eigen.to_csv(root / "eigenmodes.csv")  # header row with an empty first cell, label column
    np.savetxt(root / "gradients.csv", rng.normal(0.0, 0.1, (ROIS, sizes["G"])), delimiter=",", fmt="%.18e")
    return {"states": states, "fmri": root / "f.pth", "t1": root / "s.pth", "harmonizer": root / "h.pth",
            "eigenmodes": root / "eigenmodes.csv", "gradients": root / "gradients.csv"}


def test_the_key_table_has_the_releases_base_shapes():
    f, s, h = (expand(model, BASE) for model in TABLE)
    assert f["encoder_ema.patch_embed.proj.weight"] == (768, 1, 1, 48)
    assert f["encoder_ema.pos_embed.emb_h_encoder"] == (7200, 384) and f["encoder.pos_embed.emb_h_decoder"] == (7200, 192)
    assert f["encoder_ema.pos_embed.geo_harm_proj.weight"] == (384, 200) and f["encoder.pos_embed.grad_proj.weight"] == (384, 30)
    assert f["encoder.pos_embed.decoder_pos_embed_proj.weight"] == (192, 384)
    assert f["encoder_ema.blocks.11.attn.qkv.weight"] == (2304, 768) and f["encoder.blocks.0.mlp.fc1.weight"] == (3072, 768)
    assert f["decoder.predictor_blocks.5.attn.qkv.weight"] == (1152, 384) and f["decoder.predictor_proj.weight"] == (768, 384)
    assert s["patch_embed.proj.weight"] == (768, 1, 16, 16, 16) and s["pos_embed"] == (1, 1201, 768)
    assert s["decoder_pred.weight"] == (4096, 512)
    assert h["pos_embed"] == (1, 8401, 768) and h["decoder_pos_embed"] == (1, 8401, 512)
    assert h["latent_tokens"] == (128, 768) and h["dec_latent_token_positional_embedding"] == (1, 128, 512)
    assert h["decoder_blocks.7.attn.qkv.weight"] == (1536, 512) and h["decoder_pred.weight"] == (768, 512)
    assert len(f) == 2 * (2 + 8 + 12 * 12 + 2) + (2 + 1 + 8 + 6 * 12 + 4)


def check_nothing_left_over(release: dict, sizes: dict) -> None:
    """Convert, and check both sides: every official tensor used (copied or verified), every key of ours filled."""
    states = release["states"]
    eigen = torch.from_numpy(official.read_eigenmode_csv(release["eigenmodes"])).float()
    grads = torch.from_numpy(official.read_gradient_csv(release["gradients"])).float()
    converted = {
        "harmonix_f": official.harmonix_f_from_official(states["harmonix_f"], eigenmodes=eigen, gradients=grads),
        "harmonix_s": official.harmonix_s_from_official(states["harmonix_s"]),
        "harmonizer": official.harmonizer_from_official(states["harmonizer"]),
    }
    for kind, (model, mapped) in converted.items():
        assert mapped.problems == [], mapped.problems
        ours = model.state_dict()
        assert set(mapped.ours) == set(ours), kind  # every parameter and buffer of ours filled ...
        copied = len(mapped.ours) - (4 if kind == "harmonix_f" else 0)  # ... (F: 4 table buffers from the CSVs)
        assert copied + len(mapped.checked) == len(states[kind]), kind  # ... and every official tensor used
        model.load_state_dict(mapped.ours, strict=True)
    f_model = converted["harmonix_f"][0]
    f_state = states["harmonix_f"]
    assert torch.equal(f_model.target_encoder.tape.weight, f_state["encoder_ema.patch_embed.proj.weight"].reshape(sizes["D"], -1))
    assert torch.equal(f_model.encoder.blocks[0].attn.qkv.weight, f_state["encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(f_model.predictor.predictor_proj.weight, f_state["decoder.predictor_proj.weight"])
    assert torch.equal(f_model.target_encoder.pos_embed.eigenmodes, eigen)
    s_model, s_state = converted["harmonix_s"][0], states["harmonix_s"]
    assert torch.equal(s_model.encoder.blocks[-1].mlp.fc2.bias, s_state[f"blocks.{sizes['L'] - 1}.mlp.fc2.bias"])
    # The release's 3-D table ([axis 1 | axis 0 | axis 2]) is the one our harmonix-S builds itself.
    fresh = type(s_model)(s_model.config)
    assert torch.allclose(fresh.pos_embed, s_state["pos_embed"][0, 1:], atol=1e-6)
    h_model, h_state = converted["harmonizer"][0], states["harmonizer"]
    assert torch.equal(h_model.latent_tokens, h_state["latent_tokens"])
    assert torch.equal(h_model.decoder_blocks[0].attn.qkv.weight, h_state["decoder_blocks.0.attn.qkv.weight"])


def test_conversion_leaves_nothing_over_on_either_side(tmp_path):
    check_nothing_left_over(write_release(tmp_path / "release", SMALL), SMALL)


@pytest.mark.slow
def test_conversion_at_the_releases_base_size(tmp_path):
    check_nothing_left_over(write_release(tmp_path / "release", BASE), BASE)


def test_import_writes_a_bundle_the_workflow_uses(tmp_path):
    from bh_models.models.embeddings import load_bundle_models

    release = write_release(tmp_path / "release", SMALL)
    out = tmp_path / "bundle"
    from bh_models.cli import main

    assert main(["import-official", "--fmri", str(release["fmri"]), "--t1", str(release["t1"]), "--harmonizer",
                 str(release["harmonizer"]), "--eigenmodes", str(release["eigenmodes"]), "--gradients",
                 str(release["gradients"]), str(out)]) == 0
    assert verify_bundle(out) == []
    meta = read_bundle(out)
    assert meta["settings"]["atlas.networks"] == 17 and meta["settings"]["augment.tau"] == 35.28
    assert meta["settings"]["augment.max_patches"] == 18 and meta["settings"]["anat.tensor_grid"] == [160, 192, 160]
    assert meta["settings"]["func.standardize"] is None and "paper" in meta["settings_source"]
    fmri_model, t1_model, harmonizer, _ = load_bundle_models(bundle=out, settings=None, device=torch.device("cpu"))
    assert harmonizer.config.n_patches == 18 and harmonizer.n_tokens == 8400
    assert torch.equal(harmonizer.cls_token, release["states"]["harmonizer"]["cls_token"])
    gradients = pd.read_csv(out / "gradient_embedding.tsv", sep="\t")
    assert gradients["name"].iloc[0].startswith("17Networks_") and gradients.shape == (400, 1 + SMALL["G"])
    assert np.allclose(gradients.iloc[:, 1:].to_numpy(), np.loadtxt(release["gradients"], delimiter=","), atol=1e-9)


def test_every_missing_unexpected_or_misshapen_key_is_named(tmp_path):
    release = write_release(tmp_path / "release", SMALL)
    state = dict(release["states"]["harmonizer"])
    del state["latent_tokens"], state["blocks.1.norm2.bias"]
    state["head.weight"] = torch.zeros(2, SMALL["D"])
    state["decoder_pred.bias"] = torch.zeros(5)
    state["pos_embed"] = state["pos_embed"] + 0.5  # not the release's fixed table
    torch.save({"model": state}, release["harmonizer"])
    with pytest.raises(BHInputError) as err:
        official.import_official(fmri=release["fmri"], t1=release["t1"], harmonizer=release["harmonizer"],
                                 eigenmodes=release["eigenmodes"], gradients=release["gradients"], out=tmp_path / "b")
    message = str(err.value)
    for needle in ("unexpected key head.weight", "missing key: nothing in the release fills our latent_tokens",
                   "our blocks.1.norm2.bias", "decoder_pred.bias has shape (5,)", "pos_embed differs"):
        assert needle in message, needle
    assert not (tmp_path / "b").exists()
