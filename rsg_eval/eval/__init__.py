"""Evaluation runs: zero-shot prompt scoring (zeroshot.py) and its peer, the hierarchical NLI-head evaluation
(nli_head.py).

Import the submodules directly; this package imports nothing.
"""
