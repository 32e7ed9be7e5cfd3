"""Discovery (rules/bids.smk): the fast BIDS index and the cohort plan the rules look names up in.

``index`` walks the folders BIDS defines and reads TRs by inheritance; ``cohort``
turns each configured dataset into the subjects and runs every stage processes,
with the problems found on the way.

May import: bh_models.core only.
"""
