# TR-downsampling augmentation and the TAPE patch plan (every dataset); for the
# pretraining datasets only: subject-level splits, the packed store (one folder
# per dataset, so adding one leaves the others' shards alone) and the
# robust-scaling statistics of the training split. Downstream datasets are never
# packed: their embedding job reads their derivatives.


rule augment_samples:
    input:
        listed_timeseries=lambda w: func_manifests(w.dataset),
    output:
        out_samples=f"{STORE}/samples/{{dataset}}_samples.tsv",
    params:
        step="bh_models.store.augment:make_samples",
        dataset=lambda w: w.dataset,
        tr_factors=lambda w: dataset_entry(w)["tr_factors"],
        tau=config["augment"]["tau"],
        max_patches=config["augment"]["max_patches"],
        seed=SEED,
    log:
        log_path("augment_samples", "{dataset}"),
    threads: 1
    resources:
        mem_mb=lambda w, attempt: job_resource("augment_samples", "mem_mb", attempt, dataset_units(w.dataset, "func")),
        runtime=lambda w, attempt: job_resource("augment_samples", "runtime", attempt, dataset_units(w.dataset, "func")),
    conda:
        ENV
    script:
        STEP


rule make_splits:
    input:
        unpack(participants_tsv),
        samples=rules.augment_samples.output.out_samples,
        listed_t1_tensors=lambda w: anat_manifests(w.dataset),
    output:
        out_splits=f"{STORE}/splits/{{dataset}}_splits.tsv",
    params:
        step="bh_models.store.splits:make_splits",
        dataset=lambda w: w.dataset,
        fractions=config["splits"]["fractions"],
        stratify=lambda w: dataset_entry(w)["stratify"],
        n_bins=config["splits"]["n_bins"],
        seed=SEED,
    log:
        log_path("make_splits", "{dataset}"),
    threads: 1
    resources:
        mem_mb=lambda w, attempt: job_resource("make_splits", "mem_mb", attempt, dataset_units(w.dataset, "anat")),
        runtime=lambda w, attempt: job_resource("make_splits", "runtime", attempt, dataset_units(w.dataset, "anat")),
    conda:
        ENV
    script:
        STEP


rule pack_fmri:
    input:
        samples=rules.augment_samples.output.out_samples,
        listed_timeseries=lambda w: func_manifests(w.dataset),
        splits=rules.make_splits.output.out_splits,
    output:
        out_dir=directory(f"{STORE}/fmri/{{dataset}}"),
    params:
        step="bh_models.store.shards:pack_fmri",
        shard_size_mb=config["store"]["shard_size_mb"],
    log:
        log_path("pack_fmri", "{dataset}"),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: job_resource("pack_fmri", "mem_mb", attempt, dataset_units(w.dataset, "func")),
        runtime=lambda w, attempt: job_resource("pack_fmri", "runtime", attempt, dataset_units(w.dataset, "func")),
    conda:
        ENV
    script:
        STEP


rule pack_t1:
    input:
        listed_t1_tensors=lambda w: anat_manifests(w.dataset),
        splits=rules.make_splits.output.out_splits,
    output:
        out_dir=directory(f"{STORE}/t1/{{dataset}}"),
    params:
        step="bh_models.store.shards:pack_t1",
        dataset=lambda w: w.dataset,
        shard_size_mb=config["store"]["shard_size_mb"],
    log:
        log_path("pack_t1", "{dataset}"),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: job_resource("pack_t1", "mem_mb", attempt, dataset_units(w.dataset, "anat")),
        runtime=lambda w, attempt: job_resource("pack_t1", "runtime", attempt, dataset_units(w.dataset, "anat")),
    conda:
        ENV
    script:
        STEP


rule store_scaling:
    input:
        fmri=expand(rules.pack_fmri.output.out_dir, dataset=PRETRAIN),
    output:
        out_scaling=f"{STORE}/scaling.json",
        out_scaling_table=f"{STORE}/scaling.tsv",
    params:
        step="bh_models.store.scaling:compute_scaling",
        iqr_floor=config["store"]["iqr_floor"],
        relative_iqr_floor=config["store"]["relative_iqr_floor"],
    log:
        log_path("store_scaling", "all"),
    threads: 1
    resources:
        mem_mb=lambda w, attempt: 2000 * attempt,
        runtime=lambda w, attempt: 10 * attempt,
    conda:
        ENV
    script:
        STEP
