# Downstream evaluation per dataset: linear probes on the frozen embeddings
# (fused hub tokens, harmonix-F, harmonix-S), the FC baseline and chance, on
# shared folds, with permutation tests.
# With evaluate.finetune.enabled, the frozen encoders' tokens of every sample
# are packed once (extract_latents) and the Harmonizer is fine-tuned as well.


rule extract_latents:
    input:
        harmonizer_checkpoint=rules.pretrain_harmonizer.output.out_checkpoint,
        fmri_checkpoint=rules.pretrain_fmri.output.out_checkpoint,
        t1_checkpoint=rules.pretrain_t1.output.out_checkpoint,
        geometry=rules.pretrain_fmri.input.geometry,
        dep_fmri=rules.pretrain_fmri.input.dep_fmri,
        dep_t1=rules.pretrain_t1.input.dep_t1,
        dep_scaling=rules.store_scaling.output.out_scaling,
    output:
        out_latents=f"{MODELS}/embeddings/desc-latents_tokens.pt",
    params:
        step="bh_models.hub_finetune:extract_latents",
        store=STORE,
    log:
        log_path("extract_latents", "all"),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
    conda:
        ENV
    script:
        STEP


FINETUNE_INPUTS = (
    dict(latents=rules.extract_latents.output.out_latents,
         harmonizer_checkpoint=rules.pretrain_harmonizer.output.out_checkpoint)
    if config["evaluate"]["finetune"]["enabled"] else {}
)


rule evaluate_dataset:
    input:
        fused=rules.extract_embeddings.output.out_embeddings,
        fmri_only=rules.extract_embeddings.output.out_fmri_embeddings,
        t1_only=rules.extract_embeddings.output.out_t1_embeddings,
        timeseries=lambda w: per_run(rules.func_preprocess.output.out_timeseries, w.dataset),
        participants=lambda w: bids_file(w, "participants.tsv"),
        **FINETUNE_INPUTS,
    output:
        out_results=report(f"{EVAL}/{{dataset}}_desc-probe_results.tsv", caption=caption("eval_results"),
                           category="Evaluation", labels={"dataset": "{dataset}", "item": "results table"}),
        out_predictions=f"{EVAL}/{{dataset}}_desc-probe_predictions.tsv",
        out_figure_metrics=report(f"{EVAL}/{{dataset}}_desc-probe_metrics.png", caption=caption("eval_metrics"),
                                  category="Evaluation", labels={"dataset": "{dataset}", "item": "metrics"}),
        out_figure_roc=report(f"{EVAL}/{{dataset}}_desc-probe_roc.png", caption=caption("eval_roc"),
                              category="Evaluation", labels={"dataset": "{dataset}", "item": "ROC curves"}),
        out_figure_scatter=report(f"{EVAL}/{{dataset}}_desc-probe_scatter.png", caption=caption("eval_scatter"),
                                  category="Evaluation", labels={"dataset": "{dataset}", "item": "regression"}),
    params:
        step="bh_models.evaluate:evaluate_dataset",
        dataset=lambda w: w.dataset,
        tasks=lambda w: dataset_entry(w)["targets"],
        n_folds=config["evaluate"]["n_folds"],
        n_repeats=config["evaluate"]["n_repeats"],
        n_permutations=config["evaluate"]["n_permutations"],
        finetune=config["evaluate"]["finetune"],
        seed=SEED,
    log:
        log_path("evaluate_dataset", "{dataset}"),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    script:
        STEP


rule evaluate_pooled:
    input:
        fused=rules.extract_embeddings.output.out_embeddings,
        fmri_only=rules.extract_embeddings.output.out_fmri_embeddings,
        t1_only=rules.extract_embeddings.output.out_t1_embeddings,
        timeseries=lambda w: [p for d in DATASETS for p in per_run(rules.func_preprocess.output.out_timeseries, d)],
        participants=[str(COHORT[d].bids_root / "participants.tsv") for d in DATASETS],
        **FINETUNE_INPUTS,
    output:
        out_results=report(f"{EVAL}/pooled_desc-probe_results.tsv", caption=caption("eval_pooled_results"),
                           category="Evaluation", labels={"dataset": "pooled", "item": "results table"}),
        out_predictions=f"{EVAL}/pooled_desc-probe_predictions.tsv",
        out_figure_metrics=report(f"{EVAL}/pooled_desc-probe_metrics.png", caption=caption("eval_metrics"),
                                  category="Evaluation", labels={"dataset": "pooled", "item": "metrics"}),
        out_figure_roc=report(f"{EVAL}/pooled_desc-probe_roc.png", caption=caption("eval_roc"),
                              category="Evaluation", labels={"dataset": "pooled", "item": "ROC curves"}),
        out_figure_scatter=report(f"{EVAL}/pooled_desc-probe_scatter.png", caption=caption("eval_scatter"),
                                  category="Evaluation", labels={"dataset": "pooled", "item": "regression"}),
    params:
        step="bh_models.evaluate:evaluate_pooled",
        datasets=DATASETS,
        timeseries_datasets=lambda w: [d for d in DATASETS
                                       for _ in per_run(rules.func_preprocess.output.out_timeseries, d)],
        tasks={d: config["datasets"][d]["targets"] for d in DATASETS},
        n_folds=config["evaluate"]["n_folds"],
        n_repeats=config["evaluate"]["n_repeats"],
        n_permutations=config["evaluate"]["n_permutations"],
        finetune=config["evaluate"]["finetune"],
        seed=SEED,
    log:
        log_path("evaluate_pooled", "all"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        ENV
    script:
        STEP
