"""A1111/Forge install hook: the WebUI already provides everything this extension needs.

torch, safetensors, numpy, tqdm and gradio ship with A1111 1.10 and Forge. Only if one is
really missing (an unusual install) is it installed, through the WebUI's own pip wrapper. torch
is never installed here: the WebUI chose the right build for this machine's GPU.
"""

import launch

NEEDED = {"safetensors": "safetensors>=0.4", "numpy": "numpy", "tqdm": "tqdm"}

for module, requirement in NEEDED.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"{requirement} for sd-webui-lora-merger")
