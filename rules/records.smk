# Cohort-level records for people: the exclusion table, the methods
# boilerplate, and the audit of every output against its provenance record.
# `snakemake --report report.html` gathers these with every QC figure.


rule exclusion_table:
    input:
        # Every batch manifest (units a step refused) and every index problem table
        # (units left out before any job): what the run left out, and why.
        manifests=lambda w: [p for d in DATASETS for p in anat_manifests(d) + func_manifests(d)],
        problems=expand(rules.index_dataset.output.out_problems, dataset=DATASETS),
    output:
        out_tsv=report(f"{QC}/exclusions.tsv", caption=caption("exclusions"), category="Cohort QC",
                       labels={"dataset": "all", "table": "exclusions"}),
    params:
        step="bh_models.core.exclusions:write_exclusion_table",
    log:
        log_path("exclusion_table", "all"),
    threads: 1
    resources:
        mem_mb=lambda w, attempt: job_resource("exclusion_table", "mem_mb", attempt, sum(dataset_units(d, "all") for d in DATASETS)),
        runtime=lambda w, attempt: job_resource("exclusion_table", "runtime", attempt, sum(dataset_units(d, "all") for d in DATASETS)),
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
        mem_mb=lambda w, attempt: 1000 * attempt,
        runtime=lambda w, attempt: 5 * attempt,
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
        mem_mb=lambda w, attempt: job_resource("audit", "mem_mb", attempt, audit_files()),
        runtime=lambda w, attempt: job_resource("audit", "runtime", attempt, audit_files()),
    conda:
        ENV
    script:
        STEP
