"""The light core: errors, limits, io, tasks, data, metrics, submission, prompts, fewshot. Never imports torch.

Import the submodules directly; this package imports nothing.
"""
