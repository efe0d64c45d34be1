"""The training recipes, one folder each, on the shared engine (rsg_eval.engine): `finetune/` (`rsg finetune`,
per-task text-to-text fine-tuning) and `hmtl/` (`rsg train-hmtl`, the hierarchical multi-task model). Each recipe
owns its explicit loop and its loss scaling; everything else (process layout, device, precision, optimizer,
finishing a step, stopping, checkpoints, RNG, DDP/FSDP) comes from the engine. Import the submodules directly."""
