# Downstream evaluation per downstream dataset (and pooled over them): linear
# probes on the frozen embeddings (fused hub tokens, harmonix-F, harmonix-S),
# the FC baseline and chance, on shared folds, with permutation tests.
# With evaluate.finetune.enabled, the Harmonizer is fine-tuned as well: this stage
# writes the probes' folds (finetune_folds), the models stage's finetune job trains
# on them from the latent stores of extract_latents (GPU when it has one), and the
# evaluation reads its out-of-fold scores back as the fused_finetuned row.


rule finetune_folds:
    input:
        fused=rules.extract_embeddings.output.out_embeddings,
        fmri_only=rules.extract_embeddings.output.out_fmri_embeddings,
        t1_only=rules.extract_embeddings.output.out_t1_embeddings,
        listed_timeseries=lambda w: func_manifests(w.dataset),
        participants=lambda w: bids_file(w, "participants.tsv"),
    output:
        out_folds=FINETUNE_FOLDS,
    params:
        step="bh_models.evaluation.evaluate:write_finetune_folds",
        dataset=lambda w: w.dataset,
        tasks=lambda w: COHORT[w.dataset].tasks,
        n_folds=config["evaluate"]["n_folds"],
        n_repeats=config["evaluate"]["n_repeats"],
        seed=SEED,
    log:
        log_path("finetune_folds", "{dataset}"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        STEP


rule finetune_folds_pooled:
    input:
        fused=expand(rules.extract_embeddings.output.out_embeddings, dataset=EVALUATED),
        fmri_only=expand(rules.extract_embeddings.output.out_fmri_embeddings, dataset=EVALUATED),
        t1_only=expand(rules.extract_embeddings.output.out_t1_embeddings, dataset=EVALUATED),
        # The runner passes the listed series and, as timeseries_datasets, each one's dataset.
        listed_timeseries=lambda w: [p for d in EVALUATED for p in func_manifests(d)],
        participants=[str(COHORT[d].bids_root / "participants.tsv") for d in EVALUATED],
    output:
        out_folds=FINETUNE_FOLDS_POOLED,
    params:
        step="bh_models.evaluation.evaluate:write_finetune_folds_pooled",
        datasets=EVALUATED,
        tasks={d: COHORT[d].tasks for d in EVALUATED},
        n_folds=config["evaluate"]["n_folds"],
        n_repeats=config["evaluate"]["n_repeats"],
        seed=SEED,
    log:
        log_path("finetune_folds_pooled", "all"),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    script:
        STEP


rule evaluate_dataset:
    input:
        fused=rules.extract_embeddings.output.out_embeddings,
        fmri_only=rules.extract_embeddings.output.out_fmri_embeddings,
        t1_only=rules.extract_embeddings.output.out_t1_embeddings,
        listed_timeseries=lambda w: func_manifests(w.dataset),
        participants=lambda w: bids_file(w, "participants.tsv"),
        **(dict(finetuned=rules.finetune.output.out_predictions) if FINETUNE else {}),
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
        step="bh_models.evaluation.evaluate:evaluate_dataset",
        dataset=lambda w: w.dataset,
        tasks=lambda w: COHORT[w.dataset].tasks,  # the tasks whose participants.tsv columns exist
        n_folds=config["evaluate"]["n_folds"],
        n_repeats=config["evaluate"]["n_repeats"],
        n_permutations=config["evaluate"]["n_permutations"],
        finetune=config["evaluate"]["finetune"],
        seed=SEED,
    log:
        log_path("evaluate_dataset", "{dataset}"),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: 4000 * attempt,
        runtime=lambda w, attempt: 120 * attempt,
    conda:
        ENV
    script:
        STEP


rule evaluate_pooled:
    input:
        fused=expand(rules.extract_embeddings.output.out_embeddings, dataset=EVALUATED),
        fmri_only=expand(rules.extract_embeddings.output.out_fmri_embeddings, dataset=EVALUATED),
        t1_only=expand(rules.extract_embeddings.output.out_t1_embeddings, dataset=EVALUATED),
        # The runner passes the listed series and, as timeseries_datasets, each one's dataset.
        listed_timeseries=lambda w: [p for d in EVALUATED for p in func_manifests(d)],
        participants=[str(COHORT[d].bids_root / "participants.tsv") for d in EVALUATED],
        **(dict(finetuned=rules.finetune_pooled.output.out_predictions) if FINETUNE else {}),
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
        step="bh_models.evaluation.evaluate:evaluate_pooled",
        datasets=EVALUATED,
        tasks={d: COHORT[d].tasks for d in EVALUATED},
        n_folds=config["evaluate"]["n_folds"],
        n_repeats=config["evaluate"]["n_repeats"],
        n_permutations=config["evaluate"]["n_permutations"],
        finetune=config["evaluate"]["finetune"],
        seed=SEED,
    log:
        log_path("evaluate_pooled", "all"),
    threads: 2
    resources:
        mem_mb=lambda w, attempt: 8000 * attempt,
        runtime=lambda w, attempt: 240 * attempt,
    conda:
        ENV
    script:
        STEP
