# Functional chain, one job per rest BOLD run: motion, coregistration, one-shot
# resampling to MNI, Schaefer-400 parcellation, fMRIPrep-style confounds, denoising
# with the named strategy. Then a cohort table.


rule func_preprocess:
    input:
        bold=lambda w: bold_entry(w)["path"],
        t1w=rules.anat_preprocess.output.out_t1w,
        t1w_mask=rules.anat_preprocess.output.out_mask,
        t1w_to_mni=rules.anat_preprocess.output.out_forward,
        mni_mask=rules.anat_preprocess.output.out_mni_mask,
        mni_t1w=rules.anat_preprocess.output.out_mni_t1w,
        gm_probseg=rules.anat_preprocess.output.out_gm_probseg,
        wm_probseg=rules.anat_preprocess.output.out_wm_probseg,
        csf_probseg=rules.anat_preprocess.output.out_csf_probseg,
    output:
        out_timeseries=func_path(f"space-{SPACE}_{ATLAS.format(networks=NETWORKS)}_timeseries.tsv"),
        dep_sidecar=func_path(f"space-{SPACE}_{ATLAS.format(networks=NETWORKS)}_timeseries.json"),
        out_confounds=func_path("desc-confounds_timeseries.tsv"),
        dep_confounds_sidecar=func_path("desc-confounds_timeseries.json"),
        out_carpet=report(f"{PREPROC}/{{dataset}}/sub-{{subject}}/figures/{{bold}}_desc-carpet_bold.png",
                          caption=caption("func_carpet"), category="Functional", subcategory="{dataset}",
                          labels={"run": "{bold}", "figure": "carpet and FD"}),
        out_rois=report(f"{PREPROC}/{{dataset}}/sub-{{subject}}/figures/{{bold}}_desc-rois_bold.png",
                        caption=caption("func_rois"), category="Functional", subcategory="{dataset}",
                        labels={"run": "{bold}", "figure": "confound masks"}),
    params:
        step="bh_models.func.preprocess:preprocess_bold",
        tr_sidecar=lambda w: bold_entry(w)["tr"],
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
        log_path("func_preprocess", "{dataset}", "sub-{subject}", "{bold}"),
    group:
        "preproc"
    # One thread: ITK runs single-threaded anyway (reproducible coregistration),
    # and BLAS sums then never depend on the machine's core count.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        STEP


rule func_qc_table:
    input:
        sidecars=lambda w: per_run(rules.func_preprocess.output.dep_sidecar, w.dataset),
    output:
        out_table=report(f"{QC}/{{dataset}}_desc-func_qc.tsv", caption=caption("func_qc_table"),
                         category="Cohort QC", labels={"dataset": "{dataset}", "table": "functional"}),
    params:
        step="bh_models.func.preprocess:func_qc_table",
    log:
        log_path("func_qc_table", "{dataset}"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    script:
        STEP
