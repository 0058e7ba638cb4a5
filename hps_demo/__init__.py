"""Demo model for the parameter server: synthetic Criteo-like data, a small DLRM, training and
export to HugeCTR sparse model folders plus dense weights for the ``dlrm`` Triton backend.

Nothing here is on a serving hot path; it produces the model the demo serves.
"""
