import copy
import textwrap

import pytest
import yaml

from bh_models.core.config import check_config, config_hash, load_config, load_yaml
from bh_models.core.errors import BHConfigError
from tests.conftest import REPO


def base_config(tmp_path):
    return {"results_dir": str(tmp_path / "results"),
            "datasets": {"a": {"bids_root": str(tmp_path / "a")}, "b": {"bids_root": str(tmp_path / "b")}}}


def test_repository_config_is_valid():
    config = load_config(REPO / "config.yaml", base_dir=REPO)
    assert set(config["datasets"]) == {"siteA", "siteB", "siteC"}
    assert config["datasets"]["siteA"]["filters"]["task"] == "rest"
    assert [config["datasets"][d]["role"] for d in ("siteA", "siteB", "siteC")] == ["pretrain", "pretrain",
                                                                                  "downstream"]


def test_defaults_are_filled(tmp_path):
    config = check_config(base_config(tmp_path))
    assert config["seed"] == 42
    assert config["datasets"]["a"]["tr_factors"] == [1]
    assert config["datasets"]["a"]["tr_override"] is None
    assert config["atlas"]["networks"] == 17  # the paper's Schaefer17n400p order


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
    config["datasets"]["a"].update(role="both", targets={"dx": {"column": "diagnosis", "type": "classification"}})
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


TASKS = {"dx": {"column": "diagnosis", "type": "classification", "positive": "patient"}}


def test_a_pretraining_dataset_needs_no_targets(tmp_path):
    config = check_config(base_config(tmp_path))
    assert config["datasets"]["a"]["role"] == "pretrain" and config["datasets"]["a"]["targets"] == {}
    assert config["model"]["bundle"] is None


def test_roles_and_targets_must_agree(tmp_path):
    config = base_config(tmp_path)
    config["datasets"]["b"]["role"] = "downstream"
    with pytest.raises(BHConfigError, match=r"datasets\.b\.targets.*role downstream needs at least one target"):
        check_config(config)
    config = base_config(tmp_path)
    config["datasets"]["a"]["targets"] = TASKS
    with pytest.raises(BHConfigError, match=r"datasets\.a\.targets.*never be evaluated.*role: both"):
        check_config(config)
    config["datasets"]["a"]["role"] = "both"
    check_config(config)
    config = base_config(tmp_path)
    config["datasets"]["a"]["role"] = "trainig"
    with pytest.raises(BHConfigError, match=r"datasets\.a\.role"):
        check_config(config)


def test_something_must_train_the_models(tmp_path):
    config = base_config(tmp_path)
    for entry in config["datasets"].values():
        entry.update(role="downstream", targets=TASKS)
    with pytest.raises(BHConfigError, match=r"model\.bundle.*nothing would train the models"):
        check_config(copy.deepcopy(config))
    config["model"] = {"bundle": str(tmp_path / "bundle")}
    check_config(config)  # only downstream datasets: valid with a bundle


def test_a_bundle_run_pretrains_nothing(tmp_path):
    config = base_config(tmp_path)
    config["model"] = {"bundle": str(tmp_path / "bundle")}
    with pytest.raises(BHConfigError, match=r"datasets\.a\.role.*model\.bundle is set.*role: downstream"):
        check_config(config)


def test_the_paper_protocol_example_validates_and_is_marked(tmp_path):
    example = REPO / "workflow" / "examples" / "paper_protocol.yaml"
    config = load_config(example, base_dir=tmp_path)
    assert config["example_only"] is True
    roles = {name: entry["role"] for name, entry in config["datasets"].items()}
    assert roles == {"ukb": "pretrain", "abcd": "pretrain", "abide1": "downstream", "abide2": "downstream",
                     "adhd200": "downstream", "ppmi": "downstream", "adni": "downstream", "hcpa": "downstream"}
    assert all(entry["targets"] for name, entry in config["datasets"].items() if roles[name] == "downstream")
    # The same placeholders without the mark are refused.
    raw = load_yaml(example)
    del raw["example_only"]
    with pytest.raises(BHConfigError, match=r"results_dir.*placeholder of an example config"):
        check_config(raw, base_dir=tmp_path)
