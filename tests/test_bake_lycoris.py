"""Baking LoHa, LoKr, Tucker and DoRA modules: the same strengths and block weights as a LoRA."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from synth import write_tensors
from test_lycoris import CONV1, FC1, SHAPES, TO_K, a1111_delta, dora_file, loha_parts, lokr_parts, lora_parts

from lib_loramerge import sdlayouts
from lib_loramerge.bake.keymap import CheckpointLayout
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import bake_to_file
from lib_loramerge.ops.merge import MergeInput

F32 = torch.float32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real-shape SD1 checkpoint holding only the layers the fixtures touch (plus what makes it SD1)."""
    layout = CheckpointLayout(dict(sdlayouts.checkpoint_tensors("sd1")))
    keys = {layout.target(name).key for name in SHAPES}
    keys |= {"model.diffusion_model.out.2.bias", "cond_stage_model.transformer.text_model.final_layer_norm.bias"}
    shapes = dict(sdlayouts.checkpoint_tensors("sd1"))
    g = torch.Generator().manual_seed(4)
    tensors = {k: torch.randn(shapes[k], generator=g) * 0.05 for k in sorted(keys)}
    path = tmp_path_factory.mktemp("ckpt") / "sd1_part.safetensors"
    save_file(tensors, str(path))
    return path, layout


def baked_delta(path, out, layout, name):
    key = layout.target(name).key
    return (load_file(out)[key].double() - load_file(path)[key].double()).reshape(SHAPES[name])


@pytest.mark.parametrize("make", [lokr_parts, loha_parts, lora_parts])
def test_lycoris_and_tucker_modules_bake_as_a1111_applies_them(tmp_path, checkpoint, make):
    path, layout = checkpoint
    parts = make()
    lora_file = write_tensors(tmp_path / "l.safetensors", parts)
    ratios = {name: 0.5 + 0.25 * i for i, name in enumerate(sorted(parts))}
    inp = MergeInput(read_lora(lora_file, lazy=True), unet=0.8, te=-0.6, block_ratio=ratios.__getitem__)
    job = bake_to_file(path, [inp], tmp_path / "o.safetensors", dtype=F32)
    assert job.report.unmatched == [] and job.report.modules_baked == len(parts)
    for name, p in parts.items():
        strength = (-0.6 if name.startswith("lora_te") else 0.8) * ratios[name]
        want = strength * a1111_delta(p, SHAPES[name])
        got = baked_delta(path, job.path, layout, name)
        assert float((got - want).norm()) <= 2e-5 * float(want.norm()) + 1e-6, name


def test_dora_bakes_on_the_weight_as_it_stands_with_block_weight_inside(tmp_path, checkpoint):
    path, layout = checkpoint
    dora_path, modules = dora_file(tmp_path)
    plain = write_tensors(tmp_path / "plain.safetensors", {TO_K: lora_parts(seed=8)[TO_K]})
    ratio, multiplier, first = 0.7, 0.6, 0.9
    inputs = [MergeInput(read_lora(plain, lazy=True), unet=first),  # applied before the DoRA module
              MergeInput(read_lora(dora_path, lazy=True), unet=multiplier, te=1.0, block_ratio=lambda n: ratio)]
    job = bake_to_file(path, inputs, tmp_path / "o.safetensors", dtype=F32)
    key = layout.target(TO_K).key
    base = load_file(path)[key].double()
    # A1111 1.10: networks in prompt order; DoRA: W' = W + r·ΔW, per input column W'·m/‖W'‖, then ×multiplier
    w = base + first * a1111_delta(lora_parts(seed=8)[TO_K], SHAPES[TO_K])
    merged = w + ratio * a1111_delta({k: v for k, v in modules[TO_K].items() if k != "dora_scale"}, SHAPES[TO_K])
    magnitude = modules[TO_K]["dora_scale"].double().reshape(-1)
    want = w + multiplier * (merged * magnitude / merged.norm(dim=0, keepdim=True) - w)
    got = load_file(job.path)[key].double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the LoKr + DoRA conv module and the plain fc1 module went in too
    assert job.report.modules_baked == 4 and job.report.unmatched == []
    fc1 = baked_delta(path, job.path, layout, FC1)
    want_fc1 = ratio * 1.0 * a1111_delta(modules[FC1], SHAPES[FC1])
    assert float((fc1 - want_fc1).norm()) <= 2e-5 * float(want_fc1.norm())
    assert float(baked_delta(path, job.path, layout, CONV1).norm()) > 0
