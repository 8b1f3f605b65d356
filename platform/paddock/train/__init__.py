"""Supervised training on Ray Train workers: data feeding, the loop, DeepSpeed settings, checkpoints."""
