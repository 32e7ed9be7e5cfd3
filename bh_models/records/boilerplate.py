"""Methods boilerplate, as fMRIPrep writes one: what was done, with what, citing whom.

The text is assembled from the ``__desc__`` sentence that each processing module
defines (NiPreps style), the versions of the packages that did the work, and the
run's config. A ``__desc__`` may hold ``{name}`` or ``{name:spec}`` placeholders
(the modules format them with their own arguments in sidecars); here they are
filled from the config, or else from the module's defaults
(:func:`bh_models.core.methods.placeholder_value`), and one that nothing names is shown as ``[name]``.
A module whose sentence depends on the run in other ways may instead define
``describe_methods(*, config) -> str``, which is used in place of ``__desc__``.
Citations are matched in the text as ``Author et al. YEAR`` and listed with
their full references (:data:`CITATIONS`).

Every listed module must import: one that fails stops the boilerplate with an
error naming the module and its cause, rather than silently dropping its
methods sentence.
"""

from __future__ import annotations

import html
import importlib
import json
import pkgutil
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import bh_models
from bh_models.core.jsonio import atomic_write_text
from bh_models.core.methods import format_value, fill_placeholders, flatten_config
from bh_models.core.provenance import code_version, package_versions

#: Processing modules in the order of the methods text, grouped by section.
#: ``bh_models.models.nn`` also pulls in every submodule of the package (``bh_models.models.nn.*``);
#: any other ``bh_models`` module with a ``__desc__`` lands in "Other steps".
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Anatomical data preprocessing",
        ("bh_models.core.templates", "bh_models.anat.preprocess", "bh_models.anat.skullstrip", "bh_models.anat.registration",
         "bh_models.anat.tissues"),
    ),
    (
        "Functional data preprocessing",
        ("bh_models.func.preprocess", "bh_models.func.multiecho", "bh_models.func.motion", "bh_models.func.parcellate",
         "bh_models.func.confounds", "bh_models.func.denoise"),
    ),
    ("Geometric embedding of the cortex", ("bh_models.geometry.eigenmodes", "bh_models.geometry.gradients")),
    ("Training data", ("bh_models.store.augment", "bh_models.store.scaling", "bh_models.store.splits", "bh_models.store.shards")),
    ("Models and pretraining", ("bh_models.models.nn", "bh_models.models.train", "bh_models.models.latents",
                                "bh_models.models.bundle")),
    ("Evaluation", ("bh_models.evaluation.targets", "bh_models.evaluation.evaluate", "bh_models.models.finetune")),
)

#: The pipeline's processing modules: each must have a ``__desc__`` (tested).
REQUIRED_MODULES = (
    "bh_models.core.templates",
    "bh_models.anat.preprocess",
    "bh_models.anat.skullstrip",
    "bh_models.anat.registration",
    "bh_models.func.preprocess",
    "bh_models.func.motion",
    "bh_models.func.confounds",
    "bh_models.func.denoise",
    "bh_models.func.parcellate",
    "bh_models.anat.tissues",
    "bh_models.geometry.eigenmodes",
    "bh_models.store.augment",
    "bh_models.models.nn",
    "bh_models.evaluation.evaluate",
)

OTHER_SECTION = "Other steps"


@dataclass(frozen=True)
class Citation:
    """One reference: how the text cites it and its full entry."""

    author: str  # first author's surname as cited in text
    year: str
    reference: str
    aliases: tuple[str, ...] = ()  # other spellings of the surname (without diacritics)

    @property
    def in_text(self) -> str:
        return f"{self.author} et al. {self.year}"

    def pattern(self) -> re.Pattern[str]:
        # "Fisch et al. 2024", "Fisch et al., 2024", "Fisch et al. (2024)"
        names = "|".join(re.escape(n) for n in (self.author, *self.aliases))
        return re.compile(rf"\b(?:{names}) et al\.?,?\s*\(?{self.year}")


CITATIONS: tuple[Citation, ...] = (
    Citation(
        "Abraham",
        "2014",
        "Abraham A, Pedregosa F, Eickenberg M, Gervais P, Mueller A, Kossaifi J, Gramfort A, "
        "Thirion B, Varoquaux G. Machine learning for neuroimaging with scikit-learn. Front "
        "Neuroinform. 2014;8:14. doi:10.3389/fninf.2014.00014",
    ),
    Citation(
        "Assran",
        "2023",
        "Assran M, Duval Q, Misra I, Bojanowski P, Vincent P, Rabbat M, LeCun Y, Ballas N. "
        "Self-supervised learning from images with a joint-embedding predictive architecture. "
        "CVPR 2023. arXiv:2301.08243",
    ),
    Citation(
        "Avants",
        "2008",
        "Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image "
        "registration with cross-correlation: evaluating automated labeling of elderly and "
        "neurodegenerative brain. Med Image Anal. 2008;12(1):26-41. "
        "doi:10.1016/j.media.2007.06.004",
    ),
    Citation(
        "Avants",
        "2011",
        "Avants BB, Tustison NJ, Wu J, Cook PA, Gee JC. An open source multivariate framework for "
        "n-tissue segmentation with evaluation on public data. Neuroinformatics. 2011;9(4):381-400. "
        "doi:10.1007/s12021-011-9109-y",
    ),
    Citation(
        "Behzadi",
        "2007",
        "Behzadi Y, Restom K, Liau J, Liu TT. A component based noise correction method (CompCor) "
        "for BOLD and perfusion based fMRI. NeuroImage. 2007;37(1):90-101. doi:10.1016/j.neuroimage.2007.04.042",
    ),
    Citation(
        "Beyer",
        "2023",
        "Beyer L, Izmailov P, Kolesnikov A, Caron M, Kornblith S, Zhai X, Minderer M, "
        "Tschannen M, Alabdulmohsin I, Pavetic F. FlexiViT: one model for all patch sizes. "
        "CVPR 2023. arXiv:2212.08013",
    ),
    Citation(
        "Ciric",
        "2017",
        "Ciric R, Wolf DH, Power JD, Roalf DR, Baum GL, Ruparel K, Shinohara RT, Elliott MA, "
        "Eickhoff SB, Davatzikos C, Gur RC, Gur RE, Bassett DS, Satterthwaite TD. Benchmarking of "
        "participant-level confound regression strategies for the control of motion artifact in studies of "
        "functional connectivity. NeuroImage. 2017;154:174-187. doi:10.1016/j.neuroimage.2017.03.020",
    ),
    Citation(
        "Dong",
        "2024",
        "Dong Z, Li R, Wu Y, Nguyen TT, Chong JSX, Ji F, Tong NRJ, Chen C, Zhou JH. Brain-JEPA: brain "
        "dynamics foundation model with gradient positioning and spatiotemporal masking. Advances in "
        "Neural Information Processing Systems (NeurIPS) 2024. arXiv:2409.19407",
    ),
    Citation(
        "Dong",
        "2025",
        "Dong Z, et al. Brain Harmony: a multimodal foundation model unifying morphology and "
        "function into 1D tokens. Advances in Neural Information Processing Systems (NeurIPS) "
        "2025. arXiv:2509.24693",
    ),
    Citation(
        "Dosovitskiy",
        "2021",
        "Dosovitskiy A, Beyer L, Kolesnikov A, Weissenborn D, Zhai X, Unterthiner T, Dehghani "
        "M, Minderer M, Heigold G, Gelly S, Uszkoreit J, Houlsby N. An image is worth 16x16 "
        "words: transformers for image recognition at scale. ICLR 2021. arXiv:2010.11929",
    ),
    Citation(
        "Esteban",
        "2019",
        "Esteban O, Markiewicz CJ, Blair RW, Moodie CA, Isik AI, Erramuzpe A, Kent JD, Goncalves M, "
        "DuPre E, Snyder M, Oya H, Ghosh SS, Wright J, Durnez J, Poldrack RA, Gorgolewski KJ. fMRIPrep: a "
        "robust preprocessing pipeline for functional MRI. Nat Methods. 2019;16(1):111-116. "
        "doi:10.1038/s41592-018-0235-4",
    ),
    Citation(
        "Fisch",
        "2024",
        "Fisch L, Zumdick S, Barkhau C, Emden D, Ernsting J, Leenings R, Sarink K, Winter NR, "
        "Risse B, Dannlowski U, Hahn T. deepbet: fast brain extraction of T1-weighted MRI "
        "using convolutional neural networks. Comput Biol Med. 2024;179:108845. "
        "doi:10.1016/j.compbiomed.2024.108845",
    ),
    Citation(
        "Fonov",
        "2011",
        "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average "
        "age-appropriate atlases for pediatric studies. NeuroImage. 2011;54(1):313-327. "
        "doi:10.1016/j.neuroimage.2010.07.033",
    ),
    Citation(
        "Friston",
        "1996",
        "Friston KJ, Williams S, Howard R, Frackowiak RS, Turner R. Movement-related effects in fMRI "
        "time-series. Magn Reson Med. 1996;35(3):346-355. doi:10.1002/mrm.1910350312",
    ),
    Citation(
        "Gorgolewski",
        "2011",
        "Gorgolewski K, Burns CD, Madison C, Clark D, Halchenko YO, Waskom ML, Ghosh SS. "
        "Nipype: a flexible, lightweight and extensible neuroimaging data processing "
        "framework in Python. Front Neuroinform. 2011;5:13. doi:10.3389/fninf.2011.00013",
    ),
    Citation(
        "He",
        "2022",
        "He K, Chen X, Xie S, Li Y, Dollar P, Girshick R. Masked autoencoders are scalable "
        "vision learners. CVPR 2022. arXiv:2111.06377",
    ),
    Citation(
        "Margulies",
        "2016",
        "Margulies DS, Ghosh SS, Goulas A, Falkiewicz M, Huntenburg JM, Langs G, Bezgin G, Eickhoff SB, "
        "Castellanos FX, Petrides M, Jefferies E, Smallwood J. Situating the default-mode network along a "
        "principal gradient of macroscale cortical organization. PNAS 2016;113(44):12574-12579",
    ),
    Citation(
        "Mölder",
        "2021",
        "Mölder F, Jablonski KP, Letcher B, Hall MB, Tomkins-Tinch CH, Sochat V, Forster J, "
        "Lee S, Twardziok SO, Kanitz A, Wilm A, Holtgrewe M, Rahmann S, Nahnsen S, Köster J. "
        "Sustainable data analysis with Snakemake. F1000Research. 2021;10:33. "
        "doi:10.12688/f1000research.29032.2",
        ("Molder",),
    ),
    Citation(
        "Muschelli",
        "2014",
        "Muschelli J, Nebel MB, Caffo BS, Barber AD, Pekar JJ, Mostofsky SH. Reduction of "
        "motion-related artifacts in resting state fMRI using aCompCor. NeuroImage. 2014;96:22-35. "
        "doi:10.1016/j.neuroimage.2014.03.028",
    ),
    Citation(
        "Pang",
        "2023",
        "Pang JC, Aquino KM, Oldehinkel M, Robinson PA, Fulcher BD, Breakspear M, Fornito A. "
        "Geometric constraints on human brain function. Nature. 2023;618:566-574. "
        "doi:10.1038/s41586-023-06098-1",
    ),
    Citation(
        "Parkes",
        "2018",
        "Parkes L, Fulcher B, Yücel M, Fornito A. An evaluation of the efficacy, reliability, and "
        "sensitivity of motion correction strategies for resting-state functional MRI. NeuroImage. "
        "2018;171:415-436. doi:10.1016/j.neuroimage.2017.12.073",
    ),
    Citation(
        "Paszke",
        "2019",
        "Paszke A, Gross S, Massa F, et al. PyTorch: an imperative style, high-performance "
        "deep learning library. Advances in Neural Information Processing Systems 32 "
        "(NeurIPS) 2019. arXiv:1912.01703",
    ),
    Citation(
        "Pedregosa",
        "2011",
        "Pedregosa F, Varoquaux G, Gramfort A, et al. Scikit-learn: machine learning in "
        "Python. J Mach Learn Res. 2011;12:2825-2830",
    ),
    Citation(
        "Power",
        "2012",
        "Power JD, Barnes KA, Snyder AZ, Schlaggar BL, Petersen SE. Spurious but systematic "
        "correlations in functional connectivity MRI networks arise from subject motion. "
        "NeuroImage. 2012;59(3):2142-2154. doi:10.1016/j.neuroimage.2011.10.018",
    ),
    Citation(
        "Power",
        "2014",
        "Power JD, Mitra A, Laumann TO, Snyder AZ, Schlaggar BL, Petersen SE. Methods to detect, "
        "characterize, and remove motion artifact in resting state fMRI. NeuroImage. 2014;84:320-341. "
        "doi:10.1016/j.neuroimage.2013.08.048",
    ),
    Citation(
        "Reuter",
        "2006",
        "Reuter M, Wolter F-E, Peinecke N. Laplace-Beltrami spectra as 'Shape-DNA' of "
        "surfaces and solids. Comput Aided Des. 2006;38(4):342-366. "
        "doi:10.1016/j.cad.2005.10.011",
    ),
    Citation(
        "Satterthwaite",
        "2013",
        "Satterthwaite TD, Elliott MA, Gerraty RT, Ruparel K, Loughead J, Calkins ME, "
        "Eickhoff SB, Hakonarson H, Gur RC, Gur RE, Wolf DH. An improved framework for confound regression "
        "and filtering for control of motion artifact in the preprocessing of resting-state functional "
        "connectivity data. NeuroImage. 2013;64:240-256. doi:10.1016/j.neuroimage.2012.08.052",
    ),
    Citation(
        "Schaefer",
        "2018",
        "Schaefer A, Kong R, Gordon EM, Laumann TO, Zuo X-N, Holmes AJ, Eickhoff SB, Yeo BTT. "
        "Local-global parcellation of the human cerebral cortex from intrinsic functional "
        "connectivity MRI. Cereb Cortex. 2018;28(9):3095-3114. doi:10.1093/cercor/bhx179",
    ),
    Citation(
        "Tustison",
        "2010",
        "Tustison NJ, Avants BB, Cook PA, Zheng Y, Egan A, Yushkevich PA, Gee JC. N4ITK: "
        "improved N3 bias correction. IEEE Trans Med Imaging. 2010;29(6):1310-1320. "
        "doi:10.1109/TMI.2010.2046908",
    ),
    Citation(
        "Vaswani",
        "2017",
        "Vaswani A, Shazeer N, Parmar N, Uszkoreit J, Jones L, Gomez AN, Kaiser L, Polosukhin "
        "I. Attention is all you need. Advances in Neural Information Processing Systems 30 "
        "(NeurIPS) 2017. arXiv:1706.03762",
    ),
    Citation(
        "Wael",  # "Vos de Wael et al. 2020": cited by the last word of the surname
        "2020",
        "Vos de Wael R, Benkarim O, Paquola C, Lariviere S, Royer J, Tavakol S, Xu T, Hong SJ, Langs G, "
        "Valk S, Misic B, Milham M, Margulies D, Smallwood J, Bernhardt BC. BrainSpace: a toolbox for the "
        "analysis of macroscale gradients in neuroimaging and connectomics datasets. Commun Biol 2020;3:103",
    ),
    Citation(
        "Wachinger",
        "2015",
        "Wachinger C, Golland P, Kremen W, Fischl B, Reuter M. BrainPrint: a discriminative "
        "characterization of brain morphology. NeuroImage. 2015;109:232-248. "
        "doi:10.1016/j.neuroimage.2015.01.032",
    ),
    Citation(
        "Posse",
        "1999",
        "Posse S, Wiese S, Gembris D, Mathiak K, Kessler C, Grosse-Ruyken ML, Elghahwagi B, Richards T, "
        "Dager SR, Kiselev VG. Enhancement of BOLD-contrast sensitivity by single-shot multi-echo functional "
        "MR imaging. Magn Reson Med. 1999;42(1):87-97. doi:10.1002/(SICI)1522-2594(199907)42:1<87::AID-MRM13>3.0.CO;2-O",
    ),
    Citation(
        "Winkler",
        "2014",
        "Winkler AM, Ridgway GR, Webster MA, Smith SM, Nichols TE. Permutation inference for "
        "the general linear model. NeuroImage. 2014;92:381-397. "
        "doi:10.1016/j.neuroimage.2014.01.060",
    ),
)

_ANY_CITATION = re.compile(r"\b([A-Z][A-Za-zÀ-ÿ'-]+) et al\.?,?\s*\(?((?:19|20)\d\d)")

_LICENCE = (
    "The above boilerplate text was automatically generated by bh_models with the "
    "intention that users copy and paste it into their manuscripts unchanged. "
    "It is released under the CC0 licence."
)


@dataclass
class Descriptions:
    """``__desc__`` strings found, in section order, and what is still lacking."""

    by_section: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)  # title, (module, desc)
    undescribed: list[str] = field(default_factory=list)  # in SECTIONS, no __desc__


class BoilerplateError(RuntimeError):
    """A processing module could not give its methods sentence (the message names it and the cause)."""


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # any import failure: name the module, keep the cause
        raise BoilerplateError(f"methods boilerplate: module {name} failed to import ({type(exc).__name__}: "
                               f"{exc}); fix that module, its methods sentence cannot be left out") from exc


def _package_modules(package: str) -> list[str]:
    module = _import(package)
    if not hasattr(module, "__path__"):
        return []

    def failed(name: str) -> None:
        _import(name)  # re-raises the failure with the module named

    found = pkgutil.walk_packages(module.__path__, prefix=f"{package}.", onerror=failed)
    return sorted(info.name for info in found)


def _desc_of(module: ModuleType) -> str | None:
    desc = getattr(module, "__desc__", None)
    return " ".join(desc.split()) if isinstance(desc, str) and desc.strip() else None


def collect_descriptions() -> Descriptions:
    """Import the processing modules and collect their ``__desc__`` sentences.

    Returns
    -------
    Descriptions
        Sentences per section in :data:`SECTIONS` order (``bh_models.models.nn.*`` in
        name order), then any other ``bh_models`` module that has a
        ``__desc__`` under :data:`OTHER_SECTION`; plus the listed modules
        without a ``__desc__``.

    Raises
    ------
    BoilerplateError
        When a module fails to import, naming it and the cause.
    """
    found = Descriptions()
    placed: set[str] = set()
    for title, modules in SECTIONS:
        sentences = []
        for listed in modules:
            names = [listed] + (_package_modules(listed) if listed == "bh_models.models.nn" else [])
            for name in names:
                placed.add(name)
                module = _import(name)
                desc = _desc_of(module)
                if desc:
                    sentences.append((name, desc))
                elif name != "bh_models.models.nn":  # a package __init__ need not describe
                    found.undescribed.append(name)
        found.by_section.append((title, sentences))
    others = [(n, d) for n in _package_modules("bh_models") if n not in placed and (d := _desc_of(_import(n)))]
    if others:
        found.by_section.append((OTHER_SECTION, others))
    return found


def cited(*, text: str) -> list[Citation]:
    """Citations of :data:`CITATIONS` that ``text`` cites, alphabetically."""
    return sorted((c for c in CITATIONS if c.pattern().search(text)), key=lambda c: (c.author, c.year))


def unknown_citations(*, text: str) -> list[str]:
    """``Author et al. YEAR`` mentions in ``text`` that :data:`CITATIONS` lacks."""
    known = {(name, c.year) for c in CITATIONS for name in (c.author, *c.aliases)}
    return sorted({f"{a} et al. {y}" for a, y in _ANY_CITATION.findall(text) if (a, y) not in known})


def _module_text(name: str, desc: str, config: Mapping[str, Any]) -> str:
    module = _import(name)
    describe = getattr(module, "describe_methods", None)
    if callable(describe):
        try:
            return " ".join(str(describe(config=config)).split())
        except Exception as exc:  # any failure of a module's hook: name it, keep the cause
            raise BoilerplateError(f"methods boilerplate: {name}.describe_methods failed ({type(exc).__name__}: "
                                   f"{exc}); fix the hook or the config it reads") from exc
    return fill_placeholders(text=desc, config=config, module=module)


def _software_sentence(*, mentions_deepbet: bool) -> str:
    v = package_versions()
    tools = [
        f"ANTs through antspyx {v['antspyx']} (Avants et al. 2008; Tustison et al. 2010)",
        f"nilearn {v['nilearn']} (Abraham et al. 2014)",
        f"nipype {v['nipype']} (Gorgolewski et al. 2011)",
        f"nibabel {v['nibabel']}",
        f"LaPy {v['lapy']} (Reuter et al. 2006; Wachinger et al. 2015)",
        f"PyTorch {v['torch']} (Paszke et al. 2019)",
        f"scikit-learn {v['scikit-learn']} (Pedregosa et al. 2011)",
        f"NumPy {v['numpy']}",
        f"pandas {v['pandas']}",
    ]
    if mentions_deepbet:
        tools.insert(1, f"deepbet {v['deepbet']} (Fisch et al. 2024)")
    return "The computations used " + ", ".join(tools[:-1]) + f" and {tools[-1]}."


@dataclass(frozen=True)
class Boilerplate:
    """The methods text as structured parts, rendered to Markdown or HTML."""

    title: str
    sections: list[tuple[str, list[str]]]  # heading, paragraphs
    parameters: list[tuple[str, str]]  # dotted config key, value
    references: list[Citation]


def build_boilerplate(*, config: Mapping[str, Any]) -> Boilerplate:
    """Assemble the methods text for a config (pure apart from imports).

    Parameters
    ----------
    config : mapping
        Workflow config (values fill ``{dotted.key}`` placeholders and make the
        parameter table).

    Returns
    -------
    Boilerplate
        Sections, parameter table and the references the text cites.
    """
    found = collect_descriptions()
    module_text = " ".join(desc for _, sentences in found.by_section for _, desc in sentences)
    config_text = json.dumps(config, sort_keys=True, default=str)
    mentions_deepbet = "deepbet" in module_text.lower() or "deepbet" in config_text.lower()
    versions = package_versions()
    code = code_version()
    commit = code["commit"] if code["commit"] == "unknown" else code["commit"][:12]
    if code["dirty"]:
        commit += ", with uncommitted changes"
    intro = (
        f"Results were produced with bh_models {bh_models.__version__} (commit {commit}), "
        f"a Snakemake {versions['snakemake']} (Mölder et al. 2021) workflow implementing "
        "Brain Harmony (BrainHarmonix; Dong et al. 2025), a multimodal foundation model "
        "that compresses T1-weighted morphology and resting-state fMRI dynamics into "
        "shared brain hub tokens. " + _software_sentence(mentions_deepbet=mentions_deepbet)
    )
    sections = [("Overview", [intro])]
    for title, sentences in found.by_section:
        if sentences:
            paragraph = " ".join(_module_text(name, desc, config) for name, desc in sentences)
            sections.append((title, [paragraph]))
    parameters = [(key, format_value(value)) for key, value in flatten_config(config=config).items()]
    body = " ".join(p for _, paragraphs in sections for p in paragraphs)
    return Boilerplate(
        title="Methods",
        sections=sections,
        parameters=parameters,
        references=cited(text=body),
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(*, boilerplate: Boilerplate) -> str:
    """Markdown text of a :class:`Boilerplate`."""
    lines = [f"# {boilerplate.title}", ""]
    for heading, paragraphs in boilerplate.sections:
        lines += [f"## {heading}", ""]
        for paragraph in paragraphs:
            lines += [paragraph, ""]
    if boilerplate.parameters:
        lines += ["## Parameters", "", "| config key | value |", "| --- | --- |"]
        lines += [f"| `{_md_cell(k)}` | {_md_cell(v)} |" for k, v in boilerplate.parameters]
        lines.append("")
    lines += ["## References", ""]
    lines += [f"{i}. {c.reference}" for i, c in enumerate(boilerplate.references, start=1)]
    lines += ["", f"*{_LICENCE}*", ""]
    return "\n".join(lines)


def render_html(*, boilerplate: Boilerplate) -> str:
    """Self-contained HTML page of a :class:`Boilerplate` (no scripts, no links)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(boilerplate.title)}</title>",
        "<style>body{font-family:serif;max-width:50em;margin:2em auto;line-height:1.45}"
        "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}"
        "code{font-size:95%}</style></head><body>",
        f"<h1>{esc(boilerplate.title)}</h1>",
    ]
    for heading, paragraphs in boilerplate.sections:
        parts.append(f"<h2>{esc(heading)}</h2>")
        parts += [f"<p>{esc(p)}</p>" for p in paragraphs]
    if boilerplate.parameters:
        parts.append("<h2>Parameters</h2><table><thead><tr><th>config key</th><th>value</th></tr></thead><tbody>")
        parts += [f"<tr><td><code>{esc(k)}</code></td><td>{esc(v)}</td></tr>" for k, v in boilerplate.parameters]
        parts.append("</tbody></table>")
    parts.append("<h2>References</h2><ol>")
    parts += [f"<li>{esc(c.reference)}</li>" for c in boilerplate.references]
    parts += ["</ol>", f"<p><em>{esc(_LICENCE)}</em></p>", "</body></html>", ""]
    return "\n".join(parts)


def write_boilerplate(*, config: dict, out_md: Path, out_html: Path, threads: int = 1) -> None:
    """Step function: write the methods boilerplate as Markdown and HTML.

    Parameters
    ----------
    config : dict
        Workflow config.
    out_md : Path
        Markdown output (``.md``).
    out_html : Path
        HTML output (``.html``).
    threads : int
        Unused; accepted because the step runner passes it to every step.

    Notes
    -----
    Same config, same code and same package versions give the same bytes: the
    text holds no time, host or path.
    """
    boilerplate = build_boilerplate(config=config)
    atomic_write_text(Path(out_md), render_markdown(boilerplate=boilerplate))
    atomic_write_text(Path(out_html), render_html(boilerplate=boilerplate))
