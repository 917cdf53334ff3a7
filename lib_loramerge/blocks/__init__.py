"""Block weights as sd-webui-lora-block-weight (LBW) applies them: layouts, presets, module → block."""
