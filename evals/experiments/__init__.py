"""Experiments built from the project's own code paths (see evals/experiments/proof.py)."""
