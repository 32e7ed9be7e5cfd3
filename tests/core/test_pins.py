"""pyproject.toml and envs/*.yaml pin the same versions."""

import re
import tomllib

import yaml

from tests.conftest import REPO


def pins_from_pyproject():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    specs = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["test"]
    return dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", s).groups() for s in specs)


def test_every_dependency_is_pinned_exactly():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    for spec in data["project"]["dependencies"]:
        assert "==" in spec, f"{spec} is not pinned"


def test_conda_envs_match_pyproject():
    pins = {k.lower(): v for k, v in pins_from_pyproject().items()}
    for env in (REPO / "envs").glob("*.yaml"):
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        for line in pip:
            name, version = line.split("==")
            assert pins[name.lower()] == version, f"{env.name}: {name} {version} != {pins[name.lower()]}"
        assert set(pins) <= {line.split("==")[0].lower() for line in pip}, f"{env.name} misses a pin"
