"""Fine-tuning internals (torch). Import the submodules directly; `config` alone is torch-free."""
