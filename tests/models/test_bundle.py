"""Model bundles: manifest verification, the `bh bundle verify` command, settings mismatches."""

from __future__ import annotations

import re

import pytest

from bh_models.models.bundle import (
    BUNDLE_FORMAT,
    CHECKPOINTS,
    SETTING_KEYS,
    check_settings,
    main,
    read_bundle,
    settings_from_config,
    verify_bundle,
    write_manifest,
)
from bh_models.core.config import check_config
from bh_models.core.errors import BHConfigError
from bh_models.core.jsonio import write_json

FILES = ("bundle.json", "MODEL_CARD.md", "scaling.json", "geometry_embedding.tsv", "gradient_embedding.tsv",
         *CHECKPOINTS.values())


def make_bundle_folder(root, settings=None):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(FILES[1:]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(bytes(range(i, i + 64)))
    write_json(root / "bundle.json", {"format": BUNDLE_FORMAT, "settings": settings or {},
                                      "pretraining": {"datasets": ["ukb"]}})
    write_manifest(root, FILES)
    return root


def test_a_good_bundle_verifies(tmp_path, capsys):
    root = make_bundle_folder(tmp_path / "b")
    assert verify_bundle(root) == []
    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and f"{len(FILES)} files" in out and "ukb" in out


def test_a_flipped_byte_is_found_and_named(tmp_path, capsys):
    root = make_bundle_folder(tmp_path / "b")
    checkpoint = root / CHECKPOINTS["harmonizer"]
    data = bytearray(checkpoint.read_bytes())
    data[10] ^= 0x01
    checkpoint.write_bytes(bytes(data))
    problems = verify_bundle(root)
    assert len(problems) == 1 and CHECKPOINTS["harmonizer"] in problems[0] and "sha256 differs" in problems[0]
    assert main(["verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert CHECKPOINTS["harmonizer"] in err and "must not be used" in err


def test_missing_files_and_manifest_are_problems(tmp_path):
    root = make_bundle_folder(tmp_path / "b")
    (root / "scaling.json").unlink()
    assert any("scaling.json" in p and "missing" in p for p in verify_bundle(root))
    (root / "SHA256SUMS").unlink()
    assert "missing" in verify_bundle(root)[0]
    with pytest.raises(BHConfigError, match="model.bundle.*not a model bundle"):
        read_bundle(tmp_path / "nowhere")


def test_settings_come_from_the_config_keys(tmp_path):
    config = check_config({"results_dir": str(tmp_path / "r"), "datasets": {"a": {"bids_root": str(tmp_path / "a")}}})
    settings = settings_from_config(config)
    assert set(settings) == set(SETTING_KEYS)
    assert settings["augment.tau"] == 35.28 and settings["anat.tensor_grid"] == [160, 192, 160]


@pytest.mark.parametrize("key, ours, theirs", [("atlas.networks", 7, 17), ("augment.tau", 35.28, 30.0),
                                                ("atlas.parcels", 400, 200), ("anat.tensor_grid", [80, 96, 80],
                                                                              [160, 192, 160])])
def test_a_mismatch_names_the_key_and_both_values(key, ours, theirs):
    with pytest.raises(BHConfigError, match=rf"config key .{key}..*is {re.escape(repr(ours))} in this config.*trained with "
                                            rf"{re.escape(repr(theirs))}.*Fix: set {key}"):
        check_settings(bundle={"settings": {key: theirs}}, expected={key: ours}, bundle_path="b")


def test_unrecorded_settings_are_not_checked():
    check_settings(bundle={"settings": {"func.standardize": None}}, expected={"func.standardize": "psc"},
                   bundle_path="imported")
