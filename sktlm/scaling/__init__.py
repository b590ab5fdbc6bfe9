"""Scaling-law analysis (`sktlm scaling`): io (results tables, curves), lbfgs (multi-start Huber fits),
fit (laws, IsoFLOP, compute-optimal), plots, report. numpy/scipy/matplotlib only: never imports jax."""
