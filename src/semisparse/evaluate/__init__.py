"""Evaluation of (pruned) causal language models."""
