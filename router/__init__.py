"""llm-router: an OpenAI-compatible gateway that switches local models by driving systemd units."""

__version__ = "0.1.0"
