"""Synthetic training data made with the policy itself: Ghost Attention and safety context distillation."""
