"""`rsg train-hmtl`'s recipe: dataset (tokenised corpus and batch plan), schedules (torch-free formulas), train (the
explicit loop) and infer (Block-1 heads). Import the submodules directly: this package imports nothing."""
