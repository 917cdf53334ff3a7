"""Reading and writing LoRA files: one adapter per key format, safetensors I/O, the safe unpickler."""
