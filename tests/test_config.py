import copy
import textwrap

import pytest
import yaml

from bh_models.config import check_config, config_hash, load_config, load_yaml
from bh_models.errors import BHConfigError
from tests.conftest import REPO


def base_config(tmp_path):
    return {"results_dir": str(tmp_path / "results"),
            "datasets": {"a": {"bids_root": str(tmp_path / "a")}, "b": {"bids_root": str(tmp_path / "b")}}}


def test_repository_config_is_valid():
    config = load_config(REPO / "config.yaml", base_dir=REPO)
    assert set(config["datasets"]) == {"siteA", "siteB"}
    assert config["datasets"]["siteA"]["filters"]["task"] == "rest"


def test_defaults_are_filled(tmp_path):
    config = check_config(base_config(tmp_path))
    assert config["seed"] == 42
    assert config["datasets"]["a"]["tr_factors"] == [1]
    assert config["datasets"]["a"]["tr_override"] is None
    assert config["atlas"]["networks"] == 7


def test_unknown_key_names_key_and_fix(tmp_path):
    config = base_config(tmp_path)
    config["datasets"]["a"]["bids_rot"] = "x"
    with pytest.raises(BHConfigError, match=r"datasets\.a\.bids_rot.*unknown config key.*bids_root"):
        check_config(config)
    config = base_config(tmp_path)
    config["sed"] = 1
    with pytest.raises(BHConfigError, match=r"'sed'.*unknown.*seed"):
        check_config(config)


def test_bad_value_names_key(tmp_path):
    config = base_config(tmp_path)
    config["datasets"]["a"]["tr_override"] = -1
    with pytest.raises(BHConfigError, match=r"datasets\.a\.tr_override"):
        check_config(config)


def test_duplicate_dataset_names_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        datasets:
          siteA: {bids_root: a}
          siteA: {bids_root: b}
        """))
    with pytest.raises(BHConfigError, match=r"'siteA'.*appears twice.*unique name"):
        load_yaml(path)


def test_same_bids_root_twice_refused(tmp_path):
    config = base_config(tmp_path)
    config["datasets"]["b"]["bids_root"] = config["datasets"]["a"]["bids_root"]
    with pytest.raises(BHConfigError, match=r"datasets\.b\.bids_root.*same BIDS root"):
        check_config(config)


def test_results_inside_bids_root_refused(tmp_path):
    config = base_config(tmp_path)
    config["results_dir"] = str(tmp_path / "a" / "derivatives")
    with pytest.raises(BHConfigError, match="results_dir.*raw data must never be written"):
        check_config(config)


def test_classification_needs_positive_class(tmp_path):
    config = base_config(tmp_path)
    config["datasets"]["a"]["targets"] = {"dx": {"column": "diagnosis", "type": "classification"}}
    with pytest.raises(BHConfigError, match=r"targets\.dx\.positive"):
        check_config(config)


def test_config_hash_is_order_independent(tmp_path):
    a = check_config(base_config(tmp_path))
    b = copy.deepcopy(a)
    b["datasets"] = dict(reversed(list(b["datasets"].items())))
    assert config_hash(a) == config_hash(b)
    b["seed"] = 1
    assert config_hash(a) != config_hash(b)


def test_schema_describes_every_key():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())

    def walk(node, path):
        for name, sub in (node.get("properties") or {}).items():
            assert "description" in sub, f"{path}{name} has no description"
            walk(sub, f"{path}{name}.")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            walk(extra, f"{path}*.")

    walk(schema, "")


def test_dataset_named_pooled_refused_while_pooled_evaluation_is_on(tmp_path):
    config = base_config(tmp_path)
    config["datasets"]["pooled"] = config["datasets"].pop("b")
    with pytest.raises(BHConfigError, match=r"datasets\.pooled.*evaluate\.pooled: false"):
        check_config(config)
    config["evaluate"] = {"pooled": False}
    check_config(config)
