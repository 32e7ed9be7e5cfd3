# Pretraining as GPU jobs (CPU with the tiny configs) on the pretraining datasets:
# harmonix-F (JEPA) and harmonix-S (MAE) on the packed store; their frozen tokens of
# every training sample, encoded once per dataset (cache_latents, the release's stage 0);
# the Harmonizer trained from those latent stores. The three checkpoints, the scaling
# statistics and the two positional tables become the model bundle. Then per-dataset embeddings of every
# downstream dataset against the bundle (this run's or model.bundle). A job given
# more than one GPU runs under torchrun (DDP). Each pretraining job resumes from
# <checkpoint>.resume.pt after a kill.


rule pretrain_fmri:
    input:
        fmri=rules.store_scaling.input.fmri,
        scaling=rules.store_scaling.output.out_scaling,
        geometry=GEOMETRY_MATRIX,
        gradients=rules.geometry_gradients.output.out_gradients,
    output:
        out_checkpoint=f"{MODELS}/{CHECKPOINTS['harmonix_f']}",
        out_metrics=f"{MODELS}/harmonix-f/metrics.tsv",
        out_curve=report(f"{MODELS}/harmonix-f/loss_curve.png", caption=caption("loss_curve"),
                         category="Training", labels={"model": "harmonix-F (JEPA)"}),
    params:
        step="bh_models.models.pretrain:pretrain_fmri",
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
        t1=expand(rules.pack_t1.output.out_dir, dataset=PRETRAIN),
    output:
        out_checkpoint=f"{MODELS}/{CHECKPOINTS['harmonix_s']}",
        out_metrics=f"{MODELS}/harmonix-s/metrics.tsv",
        out_curve=report(f"{MODELS}/harmonix-s/loss_curve.png", caption=caption("loss_curve"),
                         category="Training", labels={"model": "harmonix-S (MAE)"}),
    params:
        step="bh_models.models.pretrain:pretrain_t1",
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


rule cache_latents:
    input:
        fmri_checkpoint=rules.pretrain_fmri.output.out_checkpoint,
        t1_checkpoint=rules.pretrain_t1.output.out_checkpoint,
        geometry=rules.pretrain_fmri.input.geometry,
        gradients=rules.pretrain_fmri.input.gradients,
        fmri=rules.pack_fmri.output.out_dir,
        t1=rules.pack_t1.output.out_dir,
        scaling=rules.pretrain_fmri.input.scaling,
    output:
        out_latents=directory(f"{STORE}/latents/{{dataset}}"),
    params:
        step="bh_models.models.embeddings:cache_latents",
        dataset=lambda w: w.dataset,
        split="train",
        batch_size=config["pretrain"]["harmonizer"]["batch_size"],
    log:
        log_path("cache_latents", "{dataset}"),
    threads: 2
    resources:
        gpu=min(gpus(), 1),
        mem_mb=16000,
        runtime=4 * 60,
    conda:
        ENV
    script:
        STEP


rule pretrain_harmonizer:
    input:
        latents=expand(rules.cache_latents.output.out_latents, dataset=PRETRAIN),
        fmri_checkpoint=rules.pretrain_fmri.output.out_checkpoint,
        t1_checkpoint=rules.pretrain_t1.output.out_checkpoint,
    output:
        out_checkpoint=f"{MODELS}/{CHECKPOINTS['harmonizer']}",
        out_metrics=f"{MODELS}/harmonizer/metrics.tsv",
        out_curve=report(f"{MODELS}/harmonizer/loss_curve.png", caption=caption("loss_curve"),
                         category="Training", labels={"model": "Harmonizer"}),
    params:
        step="bh_models.models.pretrain:pretrain_harmonizer",
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


rule make_bundle:
    input:
        fmri_checkpoint=rules.pretrain_fmri.output.out_checkpoint,
        t1_checkpoint=rules.pretrain_t1.output.out_checkpoint,
        harmonizer_checkpoint=rules.pretrain_harmonizer.output.out_checkpoint,
        scaling=rules.store_scaling.output.out_scaling,
        scaling_table=rules.store_scaling.output.out_scaling_table,
        geometry=rules.pretrain_fmri.input.geometry,
        gradients=rules.pretrain_fmri.input.gradients,
        splits=expand(rules.make_splits.output.out_splits, dataset=PRETRAIN),
        samples=expand(rules.augment_samples.output.out_samples, dataset=PRETRAIN),
    output:
        out_bundle=bundle_inputs()["bundle"],
        out_scaling=bundle_inputs()["dep_scaling"],
        out_scaling_table=f"{MODELS}/scaling.tsv",
        out_geometry=bundle_inputs()["dep_geometry"],
        out_gradients=bundle_inputs()["dep_gradients"],
        out_card=f"{MODELS}/MODEL_CARD.md",
        out_manifest=bundle_inputs()["dep_manifest"],
    params:
        step="bh_models.models.bundle:make_bundle",
        settings=BUNDLE_SETTINGS,
        seed=SEED,
    log:
        log_path("make_bundle", "all"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        ENV
    script:
        STEP


rule extract_embeddings:
    input:
        **bundle_inputs(),
        samples=rules.augment_samples.output.out_samples,
        listed_timeseries=lambda w: func_manifests(w.dataset),
        listed_t1_tensors=lambda w: anat_manifests(w.dataset),
    output:
        out_embeddings=f"{EMBEDDINGS}/{{dataset}}_desc-hub_embeddings.tsv",
        out_fmri_embeddings=f"{EMBEDDINGS}/{{dataset}}_desc-harmonixF_embeddings.tsv",
        out_t1_embeddings=f"{EMBEDDINGS}/{{dataset}}_desc-harmonixS_embeddings.tsv",
    params:
        step="bh_models.models.embeddings:extract_embeddings",
        dataset=lambda w: w.dataset,
        settings=BUNDLE_SETTINGS,
        batch_size=config["pretrain"]["harmonizer"]["batch_size"],
    log:
        log_path("extract_embeddings", "{dataset}"),
    threads: 2
    resources:
        gpu=min(gpus(), 1),
        mem_mb=16000,
        runtime=4 * 60,
    conda:
        ENV
    script:
        STEP


rule extract_latents:
    input:
        **bundle_inputs(),
        samples=rules.augment_samples.output.out_samples,
        listed_timeseries=lambda w: func_manifests(w.dataset),
        listed_t1_tensors=lambda w: anat_manifests(w.dataset),
    output:
        out_latents=directory(f"{EMBEDDINGS}/{{dataset}}_desc-latents_tokens"),
    params:
        step="bh_models.models.embeddings:extract_latents",
        dataset=lambda w: w.dataset,
        settings=BUNDLE_SETTINGS,
        batch_size=config["pretrain"]["harmonizer"]["batch_size"],
    log:
        log_path("extract_latents", "{dataset}"),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
    conda:
        ENV
    script:
        STEP


rule finetune:
    input:
        latents=rules.extract_latents.output.out_latents,
        harmonizer_checkpoint=HARMONIZER_CHECKPOINT,
        folds=FINETUNE_FOLDS,
    output:
        out_predictions=f"{FINETUNE_DIR}/{{dataset}}_desc-finetuned_predictions.tsv",
    params:
        step="bh_models.models.finetune:finetune_harmonizer",
        **finetune_recipe(),
        seed=SEED,
    log:
        log_path("finetune", "{dataset}"),
    threads: 2  # fixed: CPU runs are byte-identical for a given thread count
    resources:
        gpu=min(gpus(), 1),
        mem_mb=lambda w, input, threads: finetune_resources(input, [w.dataset], threads)["mem_mb"],
        runtime=lambda w, input, threads: finetune_resources(input, [w.dataset], threads)["runtime"],
    conda:
        ENV
    script:
        STEP


rule finetune_pooled:
    input:
        latents=expand(rules.extract_latents.output.out_latents, dataset=EVALUATED),
        harmonizer_checkpoint=HARMONIZER_CHECKPOINT,
        folds=FINETUNE_FOLDS_POOLED,
    output:
        out_predictions=f"{FINETUNE_DIR}/pooled_desc-finetuned_predictions.tsv",
    params:
        step="bh_models.models.finetune:finetune_harmonizer",
        **finetune_recipe(),
        seed=SEED,
    log:
        log_path("finetune_pooled", "all"),
    threads: 2
    resources:
        gpu=min(gpus(), 1),
        mem_mb=lambda w, input, threads: finetune_resources(input, EVALUATED, threads)["mem_mb"],
        runtime=lambda w, input, threads: finetune_resources(input, EVALUATED, threads)["runtime"],
    conda:
        ENV
    script:
        STEP
