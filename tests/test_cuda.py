"""On a CUDA machine, merges and bakes on the GPU give the CPU's results (skipped without CUDA)."""

import pytest
import torch
from safetensors.torch import load_file
from synth import assert_same_delta, make_modules

from lib_loramerge.jobs import bake_to_file
from lib_loramerge.model import LoraModel
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras
from lib_loramerge.synthetic import write_random_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def lora(mods, arch="sd1", name="x"):
    from pathlib import Path
    return LoraModel(modules={m.name: m for m in mods}, arch=arch, path=Path(f"{name}.safetensors"))


@pytest.mark.parametrize("mode", ["svd", "concat", "add"])
def test_merge_on_cuda_equals_cpu(mode):
    a = lora(make_modules("sd1", scope="locon", rank=4, seed=1, only="down_blocks_1|layers_2_"))
    b = lora(make_modules("sd1", scope="locon", rank=4, seed=2, only="down_blocks_1|up_blocks_1"), name="y")
    inputs = [MergeInput(a, unet=0.8, te=-0.5), MergeInput(b, unet=-1.1)]
    options = {d: MergeOptions(mode=mode, rank=6, dtype=torch.float32, device=d) for d in ("cpu", "cuda")}
    cpu, gpu = merge_loras(inputs, options["cpu"]), merge_loras(inputs, options["cuda"])
    assert [m.name for m in cpu.modules] == [m.name for m in gpu.modules]
    for c, g in zip(cpu.modules, gpu.modules, strict=True):
        assert g.up.device.type == "cpu" and g.rank == c.rank
        assert_same_delta(g.delta(), c.delta(), rel=1e-5, label=c.name)


def test_bake_on_cuda_equals_cpu(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "c.safetensors", "sd1", width_divisor=8, dtype=torch.float32)
    mods = make_modules("sd1", scope="all", rank=3, width_divisor=8, only="down_blocks_0|layers_0_|conv_in")
    inputs = [MergeInput(lora(mods), unet=0.7, te=0.3)]
    outs = {d: bake_to_file(ckpt, inputs, tmp_path / f"{d}.safetensors", dtype=torch.float32, device=d).path
            for d in ("cpu", "cuda")}
    cpu, gpu = load_file(outs["cpu"]), load_file(outs["cuda"])
    for key, value in cpu.items():
        if value.is_floating_point():
            assert_same_delta(gpu[key], value, rel=1e-6, label=key)
        else:
            assert torch.equal(gpu[key], value)
