"""The training pipeline: data, the one training loop, evaluation and reports."""
