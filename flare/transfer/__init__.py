"""Transfer-data tools (method §5): how on-distribution data is for a seed model, self-distilled data, filters.

``score.score_rows`` (seed-model NLL of the assistant tokens), ``distill.distill_rows`` (the seed's own answers,
optionally verified) and ``filter.filter_rows`` (thresholds, with reasons); ``flare data score | distill |
filter`` (``cli.py``) wrap them. Nothing is imported here, so the command line starts without torch.
"""
