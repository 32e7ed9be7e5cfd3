# Discovery: one index per dataset (runs, subjects, problems) and the derivative
# dataset's dataset_description.json.


rule index_dataset:
    input:
        dataset_description=lambda w: bids_file(w, "dataset_description.json"),
    output:
        out_runs=f"{RESULTS}/index/{{dataset}}_runs.tsv",
        out_subjects=f"{RESULTS}/index/{{dataset}}_subjects.tsv",
        out_problems=f"{RESULTS}/index/{{dataset}}_problems.tsv",
    params:
        step="bh_models.bids.cohort:write_index",
        dataset=lambda w: w.dataset,
        filters=lambda w: dataset_entry(w)["filters"],
        tr_override=lambda w: dataset_entry(w)["tr_override"],
        exclude_subjects=lambda w: dataset_entry(w)["exclude_subjects"],
        exclude_runs=lambda w: dataset_entry(w)["exclude_runs"],
        targets=lambda w: dataset_entry(w)["targets"],
    log:
        log_path("index_dataset", "{dataset}"),
    threads: 1
    resources:
        mem_mb=lambda w, attempt: job_resource("index_dataset", "mem_mb", attempt, dataset_units(w.dataset, "subjects")),
        runtime=lambda w, attempt: job_resource("index_dataset", "runtime", attempt, dataset_units(w.dataset, "subjects")),
    conda:
        ENV
    script:
        STEP


rule dataset_description:
    input:
        source=lambda w: bids_file(w, "dataset_description.json"),
    output:
        out_description=f"{PREPROC}/{{dataset}}/dataset_description.json",
    params:
        step="bh_models.core.provenance:derivative_description",
        name="bh-preproc",
        dataset=lambda w: w.dataset,
    log:
        log_path("dataset_description", "{dataset}"),
    threads: 1
    resources:
        mem_mb=lambda w, attempt: 500 * attempt,
        runtime=lambda w, attempt: 5 * attempt,
    conda:
        ENV
    script:
        STEP
