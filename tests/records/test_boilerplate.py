"""Tests of bh_models.records.boilerplate: the methods text, its placeholders and citations."""

from __future__ import annotations

import types
from html.parser import HTMLParser

from bh_models.records import boilerplate
from bh_models.records.boilerplate import (
    REQUIRED_MODULES,
    cited,
    collect_descriptions,
    fill_placeholders,
    flatten_config,
    unknown_citations,
    write_boilerplate,
)

CONFIG = {
    "seed": 42,
    "template": {"name": "MNI152NLin2009cAsym", "resolution": 2},
    "atlas": {"name": "Schaefer2018", "parcels": 400, "networks": 7},
    "datasets": {"siteA": {"bids_root": "demo_data/siteA", "tr_factors": [1, 2]}},
    "note": "<script>alert(1)</script>",
}


class _TagChecker(HTMLParser):
    """Counts unclosed tags of the kinds the page uses."""

    VOID = {"meta", "br", "hr", "img", "link", "input", "col"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_write_boilerplate_markdown_and_html(tmp_path):
    md, page = tmp_path / "methods.md", tmp_path / "methods.html"
    write_boilerplate(config=CONFIG, out_md=md, out_html=page)
    text = md.read_text()
    assert text.startswith("# Methods")
    for must in ("Dong et al. 2025", "arXiv:2509.24693", "Mölder et al. 2021", "Avants et al. 2008",
                 "Abraham et al. 2014", "Gorgolewski et al. 2011", "Reuter et al. 2006", "## References"):
        assert must in text, must
    assert "Schaefer A, Kong R" in text  # templates' __desc__ cites the atlas
    assert "| `atlas.networks` | 7 |" in text and "| `datasets.siteA.tr_factors` | [1, 2] |" in text
    html_text = page.read_text()
    assert "&lt;script&gt;" in html_text and "<script>" not in html_text
    checker = _TagChecker()
    checker.feed(html_text)
    assert checker.errors == [] and checker.stack == []
    # Same config, same bytes.
    write_boilerplate(config=CONFIG, out_md=tmp_path / "again.md", out_html=tmp_path / "again.html")
    assert (tmp_path / "again.md").read_bytes() == md.read_bytes()
    assert (tmp_path / "again.html").read_bytes() == page.read_bytes()


def test_every_reference_listed_is_cited_and_every_citation_known():
    bp = boilerplate.build_boilerplate(config=CONFIG)
    body = " ".join(p for _, paragraphs in bp.sections for p in paragraphs)
    assert unknown_citations(text=body) == []  # add new ones to boilerplate.CITATIONS
    assert [c.in_text for c in bp.references] == [c.in_text for c in cited(text=body)]


def test_processing_modules_describe_themselves():
    found = collect_descriptions()
    described = {name for _, sentences in found.by_section for name, _ in sentences}
    assert "bh_models.core.templates" in described
    assert found.undescribed == []  # every listed module has a __desc__
    assert set(REQUIRED_MODULES) <= {name for _, sentences in found.by_section for name, _ in sentences} | {
        "bh_models.models.nn"}


def test_a_module_that_fails_to_import_is_named_not_skipped(monkeypatch):
    import pytest

    monkeypatch.setattr(boilerplate, "SECTIONS", (("Broken", ("bh_models.does_not_exist",)),))
    with pytest.raises(boilerplate.BoilerplateError, match=r"module bh_models\.does_not_exist failed to import "
                                                            r"\(ModuleNotFoundError"):
        collect_descriptions()


def test_a_failing_methods_hook_is_named(monkeypatch):
    import pytest

    from bh_models.func import denoise

    def broken(*, config):
        raise KeyError("func")

    monkeypatch.setattr(denoise, "describe_methods", broken)
    with pytest.raises(boilerplate.BoilerplateError, match=r"bh_models\.func\.denoise\.describe_methods failed "
                                                            r"\(KeyError"):
        boilerplate.build_boilerplate(config=CONFIG)


def test_deepbet_is_cited_only_when_used(monkeypatch):
    def text(config):
        bp = boilerplate.build_boilerplate(config=config)
        return " ".join(p for _, paragraphs in bp.sections for p in paragraphs)

    assert "Fisch et al. 2024" in text({"anat": {"skullstrip": "deepbet"}})
    monkeypatch.setattr(boilerplate, "collect_descriptions", lambda: boilerplate.Descriptions())
    assert "Fisch et al. 2024" not in text({"anat": {"skullstrip": "ants"}})


def test_placeholders_come_from_config_then_module_defaults():
    module = types.ModuleType("fake_step")

    def step(*, tau: float = 35.28, shard_mb: int = 1024, label: str | None = None) -> None:
        """A step function with defaults."""

    step.__module__ = "fake_step"
    module.step = step
    module.MAX_PATCHES = 18
    config = {"template": {"resolution": 2}, "augment": {"tau": 20.0}, "a": {"k": 1}, "b": {"k": 2}}
    text = (
        "at {template.resolution:g} mm, tau {tau} s, shards of {shard_mb} MB, {max_patches} patches, "
        "k={k}, label {label}, set {0, 1} and {unknown}"
    )
    assert fill_placeholders(text=text, config=config, module=module) == (
        "at 2 mm, tau 20.0 s, shards of 1024 MB, 18 patches, k=[k], label [label], set {0, 1} and [unknown]"
    )


def test_flatten_config_sorts_and_keeps_lists():
    assert flatten_config(config={"b": {"y": 1, "x": [1, 2]}, "a": {}}) == {"a": {}, "b.x": [1, 2], "b.y": 1}


def test_citation_forms_are_recognised():
    text = "as in Fisch et al., 2024 and Pang et al. (2023), unlike Nobody et al. 1999"
    assert [c.author for c in cited(text=text)] == ["Fisch", "Pang"]
    assert unknown_citations(text=text) == ["Nobody et al. 1999"]


def test_methods_name_the_atlas_actually_used():
    """The FC baseline's sentence names the configured atlas and network order (not a fixed 'Schaefer-400')."""
    import copy

    from bh_models.core.config import load_config
    from bh_models.records.boilerplate import build_boilerplate, render_markdown
    from tests.conftest import REPO

    config = load_config(REPO / "config.yaml", base_dir=REPO)
    for networks in (7, 17):
        edited = copy.deepcopy(config)
        edited["atlas"]["networks"] = networks
        text = render_markdown(boilerplate=build_boilerplate(config=edited))
        assert f"Schaefer2018 atlas (Schaefer et al. 2018; 400 parcels in the {networks}-network order" in text
        assert "Schaefer et al. 2018" in text.split("## References")[1] or "Schaefer A" in text
