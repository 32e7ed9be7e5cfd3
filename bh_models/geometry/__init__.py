"""Geometric pre-alignment (rules/geometry.smk): harmonix-F's two ROI positional tables.

``eigenmodes``: Laplace-Beltrami eigenmodes of the fsLR-32k midthickness (LaPy), averaged within
Schaefer-400 parcels into the ROI x mode table. ``gradients``: functional gradients of the
pretraining cohort's training split (BrainSpace diffusion maps, aligned to the shipped HCP
reference) into the ROI x gradient table. ``qc`` draws modes and gradients on the surface and the
parcel matrix.

May import: bh_models.core only.
"""
