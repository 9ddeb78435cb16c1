"""ngcal.calibration: score sets in, a threshold with stated error rates out (torch-free).

Modules: ``normal`` (conformal order statistic, GPD tail fit, percentile baseline), ``ng``
(F1-, cost- and miss-rate-optimal thresholds on weighted NG evidence), ``fusion`` (synthetic
NG weighted n0/(n0+k) against k confirmed real NG; severity matching), ``estimate`` (the
one entry point ``calibrate``), ``policy`` (the daemon's recalibration guard rails and
rollback) and ``report`` (HTML with embedded plots; matplotlib imported lazily).
Nothing is imported here, so ``import ngcal.calibration.policy`` loads only what it needs.
"""
