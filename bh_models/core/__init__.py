"""Shared by every stage: errors, config, JSON/TSV and NIfTI I/O, hashing, templates, provenance, exclusions, the step runner.

Holds what more than one stage needs and nothing stage-specific:
``errors`` (errors that name the file or config key and the fix), ``config``
(load and validate config.yaml), ``jsonio`` and ``imagecheck`` (deterministic,
atomic writers and defensive readers), ``hashing``, ``templates`` (MNI template
and Schaefer atlas that ship offline), ``provenance`` and ``exclusions`` (the
records every job leaves), ``step`` (the one runner every rule calls) and
``cluster`` (SLURM partition/account lookup for the profile); ``storeformat`` and
``finetuneformat`` (the files the store, models and evaluation stages exchange).

May import: nothing else of bh_models. Every other subpackage may import core.
"""
