"""The demo cohort (no rules: ``bh demo``): synthetic BIDS sites with a known ground truth, and the
check of the functional chain against that truth.

``cohort`` writes the sites; ``recovery`` compares recovered series with the truth.

May import: bh_models.core only.
"""
