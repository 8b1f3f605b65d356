"""OpenAI-compatible serving on Ray Serve, and promotion of registered models to it."""
