"""Training, evaluation and inference loops."""
