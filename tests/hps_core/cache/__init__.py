"""Tests of hps_core.cache: contract suite, CPU twin specifics, kernel compilation, GPU."""
