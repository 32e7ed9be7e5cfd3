"""Models and pretraining (rules/models.smk): harmonix-F, harmonix-S and the Harmonizer (``nn/``),
training, the model bundle, embeddings and latent tokens of downstream datasets, fine-tuning.

``nn`` holds one architecture per file; ``data`` the torch datasets over the
packed store and over a downstream dataset's derivatives; ``train`` the loop,
checkpoints and DDP; ``lr_schedule`` the schedule; ``pretrain`` the three
pretraining steps and the embedding step; ``bundle`` the model bundle;
``latents`` the packed frozen-encoder tokens; ``finetune`` the fine-tuning job
on the evaluation's folds; ``flops``, ``memory`` (with the measured
``memory_table.json``) and ``training_plan`` what a training run costs and
whether it fits a GPU (``bh check-config``).

May import: bh_models.core only. It reads the store through the file formats of
bh_models.core.storeformat.
"""
