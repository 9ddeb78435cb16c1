"""ngcal.core.patchcore: see the module docstrings."""
