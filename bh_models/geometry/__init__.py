"""Geometric pre-alignment (rules/geometry.smk): Laplace-Beltrami eigenmodes of the fsLR-32k midthickness
(LaPy), averaged within Schaefer-400 parcels into the ROI x mode positional table.

``eigenmodes`` holds the step functions; ``qc`` draws modes on the surface and the parcel matrix.

May import: bh_models.core only.
"""
