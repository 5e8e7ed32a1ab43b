"""streamtune: real-time scoring with hot-swappable LoRA adapters."""

__version__ = "0.1.0"
