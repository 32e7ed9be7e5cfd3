"""Training data (rules/store.smk): TR-downsampling augmentation and the TAPE patch plan, subject-level
splits, the packed shard store of the pretraining datasets, robust-scaling statistics.

``augment`` plans samples, ``splits`` assigns subjects, ``shards`` packs the
store, ``scaling`` fits the statistics on the training split; the file formats
are :mod:`bh_models.core.storeformat`, the readers :mod:`bh_models.models.data`.

May import: bh_models.core only. It reads the functional and anatomical outputs as files.
"""
