"""Benchmarks behind `rsg bench ...`: each measures our way against the naive way in one run, on one model."""
