# Geometric pre-alignment: Laplace-Beltrami eigenmodes of the fsLR-32k
# midthickness per hemisphere (LaPy), averaged within Schaefer-400 parcels.


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
