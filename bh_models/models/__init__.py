"""Models and pretraining (rules/models.smk): harmonix-F, harmonix-S and the Harmonizer (``nn/``),
training, the latent stores, the model bundle, embeddings of downstream datasets, fine-tuning,
and the import of the paper's released checkpoints.

``nn`` holds one architecture per file (and the JEPA masks); ``data`` the torch datasets over the
packed store and over a downstream dataset's derivatives; ``train`` the loop,
checkpoints and DDP; ``lr_schedule`` the schedule; ``pretrain`` the three
pretraining steps; ``latents`` the latent-store format, writer and reader (the frozen
encoders' tokens, computed once); ``embeddings`` the steps that encode datasets
(``cache_latents``, ``extract_embeddings``, ``extract_latents``); ``bundle`` the model
bundle; ``official`` ``bh import-official``; ``finetune`` the fine-tuning job
on the evaluation's folds; ``flops``, ``memory`` (with the measured ``memory_table.json``)
and ``training_plan`` what a training run costs and whether it fits a GPU (``bh check-config``).

May import: bh_models.core only. It reads the store through the file formats of
bh_models.core.storeformat.
"""
