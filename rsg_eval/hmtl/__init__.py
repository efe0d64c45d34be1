"""Hierarchical multi-task training of FRED-T5: corpus (light), schedules, trainer and NLI-head evaluation.

Import submodules directly; this package imports nothing (corpus.py and schedules.py stay torch-free).
"""
