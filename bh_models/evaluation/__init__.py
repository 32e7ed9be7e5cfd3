"""Downstream evaluation (rules/evaluation.smk): targets, linear probes on frozen embeddings,
baselines, permutation tests, and the folds and scores of the optional fine-tuning.

``evaluate`` holds the step functions; ``targets`` reads the tasks;
``probe``, ``baselines`` and ``permutation`` are its methods; ``finetune`` writes
the probes' folds for the models stage's fine-tuning job and reads its scores back.

May import: bh_models.core only. It reads the embeddings as files.
"""
