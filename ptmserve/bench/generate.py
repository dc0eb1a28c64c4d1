"""``ptmserve bench generate``: written by the benchmark helper (placeholder while it is being built)."""
