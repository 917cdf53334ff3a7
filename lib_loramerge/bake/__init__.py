"""Baking LoRAs into SD1 / SD2 / SDXL checkpoints: the key map and the streaming writer."""
