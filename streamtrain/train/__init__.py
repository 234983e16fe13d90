"""Training: the step loop, its backend, checkpoints, stopping and the output_dir claim."""
