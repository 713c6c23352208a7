"""What every stage shares: the command-line convention (cli), quiet TensorFlow start-up
(quiet_tf), progress lines (progress), atomic file writes (atomic_files) and the run directory
(rundir)."""
