# Every rule runs its bh_models step function through this one script.
from bh_models.core.step import run_snakemake_job

run_snakemake_job(snakemake)  # noqa: F821 - injected by Snakemake
