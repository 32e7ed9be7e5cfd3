# Geometric pre-alignment: Laplace-Beltrami eigenmodes of the fsLR-32k
# midthickness per hemisphere (LaPy), averaged within Schaefer-400 parcels; and the
# functional gradients of the pretraining cohort's training split (BrainSpace),
# aligned to the shipped HCP reference. Together: harmonix-F's ROI positions.


rule geometry_eigenmodes:
    output:
        out_eigenvalues=f"{GEOMETRY}/{SURFACE}_hemi-{{hemi}}_desc-LBO_eigenvalues.tsv",
        out_eigenmodes=f"{GEOMETRY}/{SURFACE}_hemi-{{hemi}}_desc-LBO_eigenmodes.npy",
    params:
        step="bh_models.geometry.eigenmodes:compute_eigenmodes",
        surface=config["geometry"]["surface"],
        hemi=lambda w: w.hemi,
        n_modes=config["geometry"]["n_modes"],
        seed=SEED,
    log:
        log_path("geometry_eigenmodes", "hemi-{hemi}"),
    wildcard_constraints:
        hemi="L|R",
    threads: 1  # the eigensolver runs on one BLAS thread (byte-identical modes)
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        ENV
    script:
        STEP


rule geometry_project:
    input:
        eigenmodes_lh=f"{GEOMETRY}/{SURFACE}_hemi-L_desc-LBO_eigenmodes.npy",
        eigenmodes_rh=f"{GEOMETRY}/{SURFACE}_hemi-R_desc-LBO_eigenmodes.npy",
    output:
        out_matrix=f"{GEOMETRY}/{SURFACE}_{ATLAS}_desc-LBO_embedding.tsv",
        out_figure=report(f"{GEOMETRY}/{SURFACE}_{ATLAS}_desc-LBO_embedding.png",
                          caption=caption("geometry_matrix"), category="Geometry",
                          labels={"figure": "parcel x mode matrix", "networks": "{networks}"}),
    params:
        step="bh_models.geometry.eigenmodes:project_eigenmodes",
        networks=lambda w: int(w.networks),
    log:
        log_path("geometry_project", "seg-{networks}n"),
    wildcard_constraints:
        networks="7|17",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        STEP


rule geometry_plot:
    input:
        eigenmodes_lh=f"{GEOMETRY}/{SURFACE}_hemi-L_desc-LBO_eigenmodes.npy",
        eigenmodes_rh=f"{GEOMETRY}/{SURFACE}_hemi-R_desc-LBO_eigenmodes.npy",
    output:
        out_figure=report(f"{GEOMETRY}/{SURFACE}_desc-LBO_eigenmodes.png", caption=caption("geometry_modes"),
                          category="Geometry", labels={"figure": "eigenmodes on the surface"}),
    params:
        step="bh_models.geometry.eigenmodes:plot_eigenmodes",
    log:
        log_path("geometry_plot", "surface"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        STEP


rule geometry_description:
    output:
        out_description=f"{GEOMETRY}/dataset_description.json",
    params:
        step="bh_models.geometry.eigenmodes:geometry_description",
    log:
        log_path("geometry_description", "all"),
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        ENV
    script:
        STEP


rule geometry_gradients:
    input:
        # The split tables come from store.smk (included later): named by path.
        splits=expand(f"{STORE}/splits/{{dataset}}_splits.tsv", dataset=PRETRAIN),
        listed_timeseries=lambda w: [p for d in PRETRAIN for p in func_manifests(d)],
    output:
        out_gradients=GRADIENTS_MATRIX,
        out_figure=report(GRADIENTS_MATRIX.replace(".tsv", ".png"), caption=caption("geometry_gradients"),
                          category="Geometry", labels={"figure": "functional gradients on the surface"}),
    params:
        step="bh_models.geometry.gradients:compute_gradients",
        networks=NETWORKS,
        **config["geometry"]["gradients"],
    log:
        log_path("geometry_gradients", "all"),
    threads: 1  # one BLAS thread: byte-identical gradients
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        STEP
