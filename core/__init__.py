"""ngcal.core: shared contracts (artifacts, score sets, thresholds, scorer) and the PatchCore model."""
