# Anatomical chain, one job per subject: skull-strip, N4, registration to the
# template, MNI-space T1w and mask, encoder tensor, tissue segmentation, QC figures.
# Then a cohort table.


rule anat_preprocess:
    input:
        t1w=lambda w: COHORT[w.dataset].t1w[w.subject],
    output:
        out_t1w=anat_path("desc-preproc_T1w.nii.gz"),
        dep_sidecar=anat_path("desc-preproc_T1w.json"),
        out_mask=anat_path("desc-brain_mask.nii.gz"),
        out_mni_t1w=anat_path(f"space-{SPACE}_res-{RES}_desc-preproc_T1w.nii.gz"),
        out_mni_mask=anat_path(f"space-{SPACE}_res-{RES}_desc-brain_mask.nii.gz"),
        out_forward=anat_path(f"from-T1w_to-{SPACE}_mode-image_xfm.h5"),
        out_inverse=anat_path(f"from-{SPACE}_to-T1w_mode-image_xfm.h5"),
        out_tensor=anat_path(f"space-{SPACE}_res-{RES}_desc-encoder_T1w.npy"),
        out_gm_probseg=anat_path(f"space-{SPACE}_res-{RES}_label-GM_probseg.nii.gz"),
        out_wm_probseg=anat_path(f"space-{SPACE}_res-{RES}_label-WM_probseg.nii.gz"),
        out_csf_probseg=anat_path(f"space-{SPACE}_res-{RES}_label-CSF_probseg.nii.gz"),
        out_dseg=anat_path(f"space-{SPACE}_res-{RES}_dseg.nii.gz"),
        dep_dseg_sidecar=anat_path(f"space-{SPACE}_res-{RES}_dseg.json"),
        out_qc_mask=report(figure_path("sub-{subject}_desc-brainmask_T1w.png"),
                           caption=caption("anat_brainmask"), category="Anatomical",
                           subcategory="{dataset}", labels={"subject": "{subject}", "figure": "brain mask"}),
        out_qc_registration=report(figure_path(f"sub-{{subject}}_space-{SPACE}_desc-registration_T1w.png"),
                                   caption=caption("anat_registration"), category="Anatomical",
                                   subcategory="{dataset}",
                                   labels={"subject": "{subject}", "figure": "registration"}),
        out_qc_segmentation=report(figure_path(f"sub-{{subject}}_space-{SPACE}_desc-segmentation_T1w.png"),
                                   caption=caption("anat_segmentation"), category="Anatomical",
                                   subcategory="{dataset}",
                                   labels={"subject": "{subject}", "figure": "tissue segmentation"}),
    params:
        step="bh_models.anat.preprocess:preprocess_anat",
        skullstrip_method=config["anat"]["skullstrip"],
        type_of_transform=config["anat"]["type_of_transform"],
        resolution=RES,
        registration_resolution=config["anat"]["registration_resolution"],
        tensor_grid=config["anat"]["tensor_grid"],
        seed=SEED,
    log:
        log_path("anat_preprocess", "{dataset}", "sub-{subject}"),
    group:
        "preproc"
    # ITK runs on one thread (the only byte-reproducible setting for seeded
    # registration), so two subjects side by side use two cores best.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        STEP


rule anat_qc_table:
    input:
        sidecars=lambda w: per_subject(rules.anat_preprocess.output.dep_sidecar, w.dataset),
    output:
        out_table=report(f"{QC}/{{dataset}}_desc-anat_qc.tsv", caption=caption("anat_qc_table"),
                         category="Cohort QC", labels={"dataset": "{dataset}", "table": "anatomical"}),
    params:
        step="bh_models.anat.preprocess:anat_qc_table",
    log:
        log_path("anat_qc_table", "{dataset}"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    script:
        STEP
