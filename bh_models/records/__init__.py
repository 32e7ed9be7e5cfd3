"""Records for people (rules/records.smk): the methods boilerplate and the audit of every output
against its provenance.

``boilerplate`` assembles the ``__desc__`` sentence of every processing module;
``audit`` re-hashes outputs and walks their provenance chain.

May import: bh_models.core; ``boilerplate`` imports the stage modules by name only
to read their ``__desc__`` sentences.
"""
