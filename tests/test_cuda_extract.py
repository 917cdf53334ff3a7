"""On a CUDA machine, extract and resize on the GPU are as good as on the CPU (skipped without CUDA)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from synth import assert_same_delta, make_modules, write_kohya

from lib_loramerge.bake.extract import ExtractOptions
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import bake_to_file
from lib_loramerge.jobs_extract import extract_to_file
from lib_loramerge.jobs_resize import resize_to_file
from lib_loramerge.model import LoraModel
from lib_loramerge.ops.merge import MergeInput
from lib_loramerge.ops.policies import RankPolicy
from lib_loramerge.synthetic import write_random_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def test_extract_on_cuda_is_as_good_as_on_cpu_even_with_tf32_on(tmp_path):
    from pathlib import Path

    base = write_random_checkpoint(tmp_path / "b.safetensors", "sd1", width_divisor=8, dtype=torch.float32, vae=False)
    mods = make_modules("sd1", scope="attention", rank=8, alpha=8.0, width_divisor=8, seed=4)
    lora = LoraModel({m.name: m for m in mods}, arch="sd1", path=Path("x.safetensors"))
    tuned = load_file(bake_to_file(base, [MergeInput(lora)], tmp_path / "t.safetensors", dtype=torch.float32).path)
    g = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.005 * torch.randn(v.shape, generator=g) if v.ndim >= 2 else v for k, v in tuned.items()}
    save_file(tuned, str(tmp_path / "noisy.safetensors"))
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as a WebUI sets it
    try:
        jobs = {d: extract_to_file(base, tmp_path / "noisy.safetensors", tmp_path / f"{d}.safetensors",
                                   ExtractOptions(rank=4, dtype=torch.float32, device=d)) for d in ("cpu", "cuda")}
        assert torch.backends.cuda.matmul.allow_tf32  # restored after the job
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    cpu, gpu = (read_lora(jobs[d].path).modules for d in ("cpu", "cuda"))
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        a, b = jobs["cpu"].report.quality[name], jobs["cuda"].report.quality[name]
        assert abs(a.retained - b.retained) < 2e-4 and b.excess is not None and b.excess < 0.01, name
        assert gpu[name].up.device.type == "cpu" and gpu[name].rank == 4


def test_resize_on_cuda_equals_cpu(tmp_path):
    src = write_kohya(tmp_path / "s.safetensors", make_modules("sd1", scope="locon", rank=8, seed=2,
                                                               only="down_blocks_1|layers_2_"))
    jobs = {d: resize_to_file(src, tmp_path / f"{d}.safetensors", RankPolicy("threshold", 0.8, cap=6), device=d,
                              dtype=torch.float32) for d in ("cpu", "cuda")}
    assert jobs["cpu"].ranks == jobs["cuda"].ranks
    cpu, gpu = (read_lora(jobs[d].path).modules for d in ("cpu", "cuda"))
    for name, module in cpu.items():
        assert_same_delta(gpu[name].delta(), module.delta(), rel=1e-5, label=name)
