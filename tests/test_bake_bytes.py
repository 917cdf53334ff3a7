"""The bake's bytes: whatever the pipeline (kernel-side copies, reused buffers, overlap), the file is the one
the plain algorithm writes — load everything, W ← cast(W.float() + Σ strength·ΔW) key by key, save."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synth import make_modules, write_kohya

from lib_loramerge.bake.keymap import CheckpointLayout
from lib_loramerge.cli import main
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.synthetic import write_random_checkpoint

NARROW = {"sd1": 8, "sdxl": 16}


def reference_bake(ckpt, loras: list[tuple[str, float]], out, dtype: torch.dtype | None) -> None:
    """The straightforward algorithm: every tensor in memory, ΔW dense per module, in input order."""
    with torch.inference_mode():
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # the bake's own setting on the CPU: matmul results do not depend on it then
        try:
            tensors = load_file(str(ckpt))
            layout = CheckpointLayout({k: tuple(v.shape) for k, v in tensors.items()})
            patched: dict[str, torch.Tensor] = {}
            for path, strength in loras:
                for name, module in read_lora(path).modules.items():
                    target = layout.target(name)
                    weight = patched.setdefault(target.key, tensors[target.key].to(torch.float32, copy=True))
                    region = weight if target.rows is None else weight[target.rows[0]:target.rows[1]]
                    region.add_(module.delta(torch.float32).reshape(region.shape), alpha=strength)
            out_tensors = {}
            for key, t in tensors.items():
                t = patched.get(key, t)
                keep = dtype is None or not t.is_floating_point()
                out_tensors[key] = (t.to(tensors[key].dtype) if keep else t.to(dtype)).contiguous()
        finally:
            torch.set_num_threads(before)
    with safe_open(str(out), "pt") as f:  # the same metadata, so only the tensors can differ
        metadata = f.metadata()
    save_file(out_tensors, str(out) + ".reference", metadata=metadata)


@pytest.mark.parametrize("arch, ckpt_dtype, out_dtype", [
    ("sd1", torch.float16, "fp16"),  # the common case: untouched tensors copied as bytes
    ("sd1", torch.float32, "fp16"),  # every tensor cast
    ("sd1", torch.float32, "keep"),
    ("sdxl", torch.float16, "fp16"),  # fused OpenCLIP q/k/v rows
])
def test_bake_writes_exactly_the_plain_algorithms_bytes(tmp_path, capsys, arch, ckpt_dtype, out_dtype):
    d = NARROW[arch]
    ckpt = write_random_checkpoint(tmp_path / "base.safetensors", arch, width_divisor=d, dtype=ckpt_dtype, seed=5)
    a = write_kohya(tmp_path / "a.safetensors", make_modules(arch, rank=4, alpha=2, seed=1, width_divisor=d),
                    dtype=torch.float16)
    b = write_kohya(tmp_path / "b.safetensors",
                    make_modules(arch, scope="attention", rank=3, seed=2, width_divisor=d, only="attn|self_attn"))
    out = tmp_path / "baked.safetensors"
    code = main(["bake", "--checkpoint", str(ckpt), "--models", str(a), str(b), "--ratios", "0.8", "-0.35",
                 "--dtype", out_dtype, "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    reference_bake(ckpt, [(a, 0.8), (b, -0.35)], out, None if out_dtype == "keep" else torch.float16)
    got, want = out.read_bytes(), (tmp_path / "baked.safetensors.reference").read_bytes()
    assert len(got) == len(want)
    # safetensors orders metadata keys by a per-process hash: compare the header as JSON, the data as bytes
    size = int.from_bytes(got[:8], "little")
    assert size == int.from_bytes(want[:8], "little")
    assert json.loads(got[8:8 + size]) == json.loads(want[8:8 + size])
    assert got[8 + size:] == want[8 + size:]
