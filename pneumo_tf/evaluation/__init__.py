"""Evaluation library: scoring a split (scoring), metrics with CIs (metrics), calibration and the
threshold decision (calibration), reports (report, shift), evaluating a run (evaluator),
comparing runs (comparison), re-fitting on a site (site_calibration), ensembles (ensemble)."""
