"""Model code (imports torch). Import submodules directly; this package imports nothing."""
