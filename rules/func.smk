# Functional chain, one job per batch of subjects: for each rest BOLD run, motion,
# coregistration, one-shot resampling to MNI, Schaefer-400 parcellation, fMRIPrep-style
# confounds, denoising with the named strategy. A run reads its subject's anatomical
# outputs (the anatomical batch of the same label); a run whose T1w was excluded is
# excluded with that reason. Then a cohort table.


rule func_preprocess:
    input:
        # The raw files are tracked through batch_raw_signature (a param); this input only
        # gives a dated-back manifest (a batch with deleted files) something newer than it.
        dep_dataset=lambda w: bids_file(w, "dataset_description.json"),
        needs_manifest=rules.anat_preprocess.output.out_manifest,
    output:
        out_manifest=MANIFEST["func"],
        out_qc=report(BATCH_QC["func"],
                      caption=caption("func_batch_qc"), category="Functional", subcategory="{dataset}",
                      labels={"batch": "{batch}", "figures": "carpet and FD"}),
    params:
        step="bh_models.func.preprocess:preprocess_bold",
        batch_units=lambda w: batch_units(w, "func"),
        batch_outputs=lambda w: func_outputs(w.dataset),
        batch_raw_signature=lambda w: batch_raw_signature(w, "func"),
        batch_figures=["out_carpet", "out_rois"],
        tr_override=lambda w: dataset_entry(w)["tr_override"],
        resolution=RES,
        networks=NETWORKS,
        min_volumes=config["func"]["min_volumes"],
        detrend=config["func"]["detrend"],
        high_pass=config["func"]["high_pass"],
        low_pass=config["func"]["low_pass"],
        denoise=config["func"]["denoise"],
        gsr=config["func"]["gsr"],
        fd_threshold=config["func"]["scrubbing"]["fd_threshold"],
        std_dvars_threshold=config["func"]["scrubbing"]["std_dvars_threshold"],
        min_segment=config["func"]["scrubbing"]["min_segment"],
        standardize=config["func"]["standardize"],
        seed=SEED,
    log:
        log_path("func_preprocess", "{dataset}", "batch-{batch}"),
    group:
        "preproc"
    # One thread per unit: ITK runs single-threaded anyway (reproducible
    # coregistration), and BLAS sums then never depend on the machine's core count.
    threads: lambda w: batch_threads(w, "func")
    resources:
        mem_mb=lambda w, threads, attempt: batch_resource(w, "func_preprocess", "mem_mb", threads, attempt),
        runtime=lambda w, threads, attempt: batch_resource(w, "func_preprocess", "runtime", threads, attempt),
    conda:
        ENV
    script:
        STEP


rule func_qc_table:
    input:
        listed_sidecars=lambda w: func_manifests(w.dataset),
    output:
        out_table=report(f"{QC}/{{dataset}}_desc-func_qc.tsv", caption=caption("func_qc_table"),
                         category="Cohort QC", labels={"dataset": "{dataset}", "table": "functional"}),
    params:
        step="bh_models.func.preprocess:func_qc_table",
    log:
        log_path("func_qc_table", "{dataset}"),
    threads: 1
    resources:
        mem_mb=lambda w, attempt: job_resource("func_qc_table", "mem_mb", attempt, dataset_units(w.dataset, "func")),
        runtime=lambda w, attempt: job_resource("func_qc_table", "runtime", attempt, dataset_units(w.dataset, "func")),
    conda:
        ENV
    script:
        STEP
