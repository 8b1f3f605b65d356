"""Distributed PPO: the shared rollout buffer, learners, weight publishing and the loop (ARCHITECTURE.md)."""
