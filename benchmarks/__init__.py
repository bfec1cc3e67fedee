"""Scripts that print speed and memory figures (not tests)."""
