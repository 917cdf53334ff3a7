"""sd-webui-lora-merger: merge LoRAs exactly and fast, bake them into checkpoints, extract and resize them, inspect them.

Library entry points (import what you need, e.g. ``from lib_loramerge.formats.reader import read_lora``):
``read_lora``, ``save_lora``, ``merge_loras``, ``bake_checkpoint``, ``inspect_lora``,
``jobs_extract.extract_to_file``, ``jobs_resize.resize_to_file``.
"""

__version__ = "0.1.0"
