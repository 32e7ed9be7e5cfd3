"""bh_models: a reproducible Brain Harmony (BrainHarmonix) pipeline.

Every computation of the Snakemake workflow lives in this package, one module
per idea, so that it can be imported and unit-tested.
"""

__version__ = "0.1.0"
