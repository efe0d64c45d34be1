"""The hierarchical model's corpus (light), labels and NLI-head evaluation. Its trainer, schedules, dataset and
inference live in rsg_eval.training.hmtl. Import submodules directly; this package imports nothing."""
