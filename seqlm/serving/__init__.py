"""Serving a trained model: the OpenAI-compatible server on transformers serve's engine, and its chat page (web/)."""
