"""Functional chain (rules/func.smk): TR, head motion, coregistration, one-shot resampling to MNI,
Schaefer-400 parcel series, confound cleaning, QC.

``preprocess`` is the step function (one rest BOLD run per job); ``tr``,
``motion``, ``resample``, ``parcellate`` and ``confounds`` are its methods;
``qc`` draws the carpet plot.

May import: bh_models.core only. It reads the anatomical outputs as files.
"""
