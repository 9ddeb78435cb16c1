"""ngcal.export: see the module docstrings."""
