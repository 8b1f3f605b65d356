"""Generation workers and scorers (reference log-probs, reward models), shared by RS, PPO, GAtt, CD and eval."""
