"""Models: the shared text encoder with per-task LoRA adapters, the click model, and the runtime."""
