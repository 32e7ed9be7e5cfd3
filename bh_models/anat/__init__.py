"""Anatomical chain (rules/anat.smk): skull-strip, N4, registration to the MNI template, encoder tensor, QC.

``preprocess`` is the step function (one T1w per job); ``skullstrip`` and
``registration`` are its methods; ``qc`` draws its figures.

May import: bh_models.core only. Other stages read its outputs as files.
"""
