# Pretraining as GPU jobs (CPU with the tiny configs): harmonix-F (JEPA) and
# harmonix-S (MAE) on the packed store, then the Harmonizer on their frozen
# tokens, then per-subject embeddings. A job given more than one GPU runs under
# torchrun (DDP). Each job resumes from <checkpoint>.resume.pt after a kill.


rule pretrain_fmri:
    input:
        dep_fmri=expand(rules.pack_fmri.output.out_dir, dataset=DATASETS),
        dep_scaling=rules.store_scaling.output.out_scaling,
        geometry=GEOMETRY_MATRIX,
    output:
        out_checkpoint=f"{MODELS}/harmonix-f/checkpoint.pt",
        out_metrics=f"{MODELS}/harmonix-f/metrics.tsv",
        out_curve=report(f"{MODELS}/harmonix-f/loss_curve.png", caption=caption("loss_curve"),
                         category="Training", labels={"model": "harmonix-F (JEPA)"}),
    params:
        step="bh_models.pretrain:pretrain_fmri",
        store=STORE,
        **training("fmri"),
    log:
        log_path("pretrain_fmri", "all"),
    threads: 2  # CPU threads of the step (data and, without a GPU, the model); fixed for byte-identical CPU runs
    resources:
        gpu=gpus(),
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        ENV
    script:
        STEP


rule pretrain_t1:
    input:
        dep_t1=expand(rules.pack_t1.output.out_dir, dataset=DATASETS),
    output:
        out_checkpoint=f"{MODELS}/harmonix-s/checkpoint.pt",
        out_metrics=f"{MODELS}/harmonix-s/metrics.tsv",
        out_curve=report(f"{MODELS}/harmonix-s/loss_curve.png", caption=caption("loss_curve"),
                         category="Training", labels={"model": "harmonix-S (MAE)"}),
    params:
        step="bh_models.pretrain:pretrain_t1",
        store=STORE,
        **training("t1"),
    log:
        log_path("pretrain_t1", "all"),
    threads: 2
    resources:
        gpu=gpus(),
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        ENV
    script:
        STEP


rule pretrain_harmonizer:
    input:
        fmri_checkpoint=rules.pretrain_fmri.output.out_checkpoint,
        t1_checkpoint=rules.pretrain_t1.output.out_checkpoint,
        geometry=rules.pretrain_fmri.input.geometry,
        dep_fmri=rules.pretrain_fmri.input.dep_fmri,
        dep_t1=rules.pretrain_t1.input.dep_t1,
        dep_scaling=rules.store_scaling.output.out_scaling,
    output:
        out_checkpoint=f"{MODELS}/harmonizer/checkpoint.pt",
        out_metrics=f"{MODELS}/harmonizer/metrics.tsv",
        out_curve=report(f"{MODELS}/harmonizer/loss_curve.png", caption=caption("loss_curve"),
                         category="Training", labels={"model": "Harmonizer"}),
    params:
        step="bh_models.pretrain:pretrain_harmonizer",
        store=STORE,
        **training("harmonizer"),
    log:
        log_path("pretrain_harmonizer", "all"),
    threads: 2
    resources:
        gpu=gpus(),
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        ENV
    script:
        STEP


rule extract_embeddings:
    input:
        harmonizer_checkpoint=rules.pretrain_harmonizer.output.out_checkpoint,
        fmri_checkpoint=rules.pretrain_fmri.output.out_checkpoint,
        t1_checkpoint=rules.pretrain_t1.output.out_checkpoint,
        geometry=rules.pretrain_fmri.input.geometry,
        dep_fmri=rules.pretrain_fmri.input.dep_fmri,
        dep_t1=rules.pretrain_t1.input.dep_t1,
        dep_scaling=rules.store_scaling.output.out_scaling,
    output:
        out_embeddings=f"{MODELS}/embeddings/desc-hub_embeddings.tsv",
        out_fmri_embeddings=f"{MODELS}/embeddings/desc-harmonixF_embeddings.tsv",
        out_t1_embeddings=f"{MODELS}/embeddings/desc-harmonixS_embeddings.tsv",
    params:
        step="bh_models.pretrain:extract_embeddings",
        store=STORE,
        batch_size=config["pretrain"]["harmonizer"]["batch_size"],
    log:
        log_path("extract_embeddings", "all"),
    threads: 2
    resources:
        gpu=min(gpus(), 1),
        mem_mb=16000,
        runtime=4 * 60,
    conda:
        ENV
    script:
        STEP
