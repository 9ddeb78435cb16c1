"""ngcal.calibration: see the module docstrings."""
