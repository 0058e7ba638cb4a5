"""Hierarchical Parameter Server (HPS): a Python successor to HugeCTR's HPS.

The library has no Triton import: ``backend/hps`` adapts it to Triton's Python-based
backend API, and :mod:`hps_core.serving` launches a real Triton Inference Server binary.
"""

__version__ = "0.1.0"
