"""ngcal.core: shared contracts (artifacts, score sets, thresholds, scorer) and PatchCore."""
