# Cohort-level records for people: the exclusion table, the methods
# boilerplate, and the audit of every output against its provenance record.
# `snakemake --report report.html` gathers these with every QC figure.


rule exclusion_table:
    input:
        # After the cohort tables, so the table lists every failure of the run.
        dep_qc=lambda w: expand(rules.anat_qc_table.output.out_table, dataset=DATASETS)
        + expand(rules.func_qc_table.output.out_table, dataset=DATASETS),
    output:
        out_tsv=report(f"{QC}/exclusions.tsv", caption=caption("exclusions"), category="Cohort QC",
                       labels={"dataset": "all", "table": "exclusions"}),
    params:
        step="bh_models.core.exclusions:write_exclusion_table",
        # The exclusion records under results/exclusions/ are side records of the step
        # runner (like logs, no rule declares them); the folder follows from the output.
        results_dir=lambda w, output: str(Path(output.out_tsv).parents[1]),
    log:
        log_path("exclusion_table", "all"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    script:
        STEP


rule boilerplate:
    output:
        out_md=f"{QC}/methods_boilerplate.md",
        out_html=report(f"{QC}/methods_boilerplate.html", caption=caption("boilerplate"), category="Methods",
                        labels={"item": "boilerplate"}),
    params:
        step="bh_models.records.boilerplate:write_boilerplate",
        config=config,
    log:
        log_path("boilerplate", "all"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        STEP


rule audit:
    input:
        dep_all=lambda w: final_targets(),
    output:
        out_tsv=f"{QC}/audit.tsv",
        out_html=report(f"{QC}/audit.html", caption=caption("audit"), category="Provenance",
                        labels={"item": "audit"}),
    params:
        step="bh_models.records.audit:write_audit",
        # Reads every job's provenance record (results/provenance/, written by the step
        # runner beside each job's outputs, like its log) and re-hashes the outputs.
        results_dir=lambda w, output: str(Path(output.out_tsv).parents[1]),
    log:
        log_path("audit", "all"),
    threads: 2
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    script:
        STEP
