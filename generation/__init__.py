"""ngcal.generation: see the module docstrings."""
