# Anatomical chain, one job per batch of subjects (bh_models.core.batches): for each
# subject's T1w, skull-strip, N4, registration to the template, MNI-space T1w and mask,
# encoder tensor, tissue segmentation, QC figures, written at their BIDS-derivatives
# paths; the job's declared outputs are the batch's manifest and QC page. Then a cohort table.


rule anat_preprocess:
    input:
        # The raw files are tracked through batch_raw_signature (a param); this input only
        # gives a dated-back manifest (a batch with deleted files) something newer than it.
        dep_dataset=lambda w: bids_file(w, "dataset_description.json"),
    output:
        out_manifest=MANIFEST["anat"],
        out_qc=report(BATCH_QC["anat"],
                      caption=caption("anat_batch_qc"), category="Anatomical", subcategory="{dataset}",
                      labels={"batch": "{batch}", "figures": "brain masks and registrations"}),
    params:
        step="bh_models.anat.preprocess:preprocess_anat",
        batch_units=lambda w: batch_units(w, "anat"),
        batch_outputs=lambda w: anat_outputs(w.dataset),
        batch_raw_signature=lambda w: batch_raw_signature(w, "anat"),
        batch_figures=["out_qc_mask", "out_qc_registration", "out_qc_segmentation"],
        skullstrip_method=config["anat"]["skullstrip"],
        type_of_transform=config["anat"]["type_of_transform"],
        resolution=RES,
        registration_resolution=config["anat"]["registration_resolution"],
        tensor_grid=config["anat"]["tensor_grid"],
        seed=SEED,
    log:
        log_path("anat_preprocess", "{dataset}", "batch-{batch}"),
    group:
        "preproc"
    # Each unit runs on one thread (ITK single-threaded: the only byte-reproducible
    # setting for seeded registration); a batch runs `threads` units at once.
    threads: lambda w: batch_threads(w, "anat")
    resources:
        mem_mb=lambda w, threads, attempt: batch_resource(w, "anat_preprocess", "mem_mb", threads, attempt),
        runtime=lambda w, threads, attempt: batch_resource(w, "anat_preprocess", "runtime", threads, attempt),
    conda:
        ENV
    script:
        STEP


rule anat_qc_table:
    input:
        listed_sidecars=lambda w: anat_manifests(w.dataset),
    output:
        out_table=report(f"{QC}/{{dataset}}_desc-anat_qc.tsv", caption=caption("anat_qc_table"),
                         category="Cohort QC", labels={"dataset": "{dataset}", "table": "anatomical"}),
    params:
        step="bh_models.anat.preprocess:anat_qc_table",
    log:
        log_path("anat_qc_table", "{dataset}"),
    threads: 1
    resources:
        mem_mb=lambda w, attempt: job_resource("anat_qc_table", "mem_mb", attempt, dataset_units(w.dataset, "anat")),
        runtime=lambda w, attempt: job_resource("anat_qc_table", "runtime", attempt, dataset_units(w.dataset, "anat")),
    conda:
        ENV
    script:
        STEP
