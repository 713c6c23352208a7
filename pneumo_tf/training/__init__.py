"""Training library: the run's configuration (config), the training loop (loop), distribution
(distribute) and the precision probe (precision_probe, bench_results)."""
