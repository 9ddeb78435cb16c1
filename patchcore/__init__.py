"""ngcal.patchcore: see the module docstrings."""
