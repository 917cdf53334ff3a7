"""LyCORIS merges and the DoRA bake function on CUDA give the CPU's results (skipped without CUDA)."""

import pytest
import torch
from test_lycoris import TO_K, _rand, dense, dora_file, files, mixed_inputs  # noqa: F401  (files: a fixture)

from lib_loramerge.formats.reader import read_lora
from lib_loramerge.ops.dora import apply_dora
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.mark.parametrize("mode,rank", [("concat", None), ("svd", 8), ("svd", None)])
def test_lycoris_merges_on_cuda_equal_cpu(files, mode, rank):  # noqa: F811
    paths, _ = files
    cases = {"mixed": lambda: mixed_inputs(paths),
             "one LoKr (Kronecker route)": lambda: [MergeInput(read_lora(paths["lokr"], lazy=True), unet=0.7)]}
    for label, make in cases.items():
        cpu = merge_loras(make(), MergeOptions(mode=mode, rank=rank, dtype=torch.float32, device="cpu"))
        gpu = merge_loras(make(), MergeOptions(mode=mode, rank=rank, dtype=torch.float32, device="cuda"))
        assert [m.name for m in cpu.modules] == [m.name for m in gpu.modules], label
        for a, b in zip(cpu.modules, gpu.modules, strict=True):
            assert a.rank == b.rank and a.up.device.type == "cpu" == b.up.device.type, (label, a.name)
            want = dense(a)
            assert float((dense(b) - want).norm() / want.norm()) < 1e-4, (label, a.name)


def test_apply_dora_on_cuda_equals_cpu(tmp_path):
    path, _ = dora_file(tmp_path)
    module = read_lora(path, lazy=True).modules[TO_K]
    base = _rand(21)(320, 768) * 2
    cpu = apply_dora(base, module, 0.8)
    gpu = apply_dora(base.cuda(), module, 0.8)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
