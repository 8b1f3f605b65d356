"""paddock: train Llama 2-style chat models end to end on Ray."""

__version__ = "0.1.0"
