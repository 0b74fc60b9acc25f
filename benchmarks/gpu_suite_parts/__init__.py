"""Helpers of benchmarks/gpu_suite.py, one module per part (train_part, kernels, quality) plus common."""
