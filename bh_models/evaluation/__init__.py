"""Downstream evaluation (rules/evaluation.smk): targets, linear probes on frozen embeddings,
baselines, permutation tests, optional fine-tuning on the probe's folds.

``evaluate`` holds the step functions; ``targets`` reads the tasks;
``probe``, ``baselines``, ``permutation`` and ``finetune`` are its methods.

May import: bh_models.core only. It reads the embeddings as files.
"""
