"""ngcal.generation: synthetic NG evidence (GLASS feature- and image-space anomalies)."""
