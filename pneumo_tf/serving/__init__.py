"""Serving library: a run's serving facts and runners (runtime), export to SavedModel / TFLite
(export), the out-of-distribution guard (ood) and the host predictor (predictor)."""
