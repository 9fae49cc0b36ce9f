"""llm-sidecar: one OpenAI-compatible endpoint in front of every model an application uses."""

__version__ = "0.1.0"
