"""Writing kohya LoRA files: values per dtype, metadata, hashes over the written bytes, atomicity."""

import hashlib
import io
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from synth import make_modules

from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats import safetensors_io
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.formats.writer import parse_dtype, save_lora


def data_section(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n:]


def kohya_hashes(tensors, metadata):
    """kohya's precalculate_safetensors_hashes, restated: serialise with ss_* metadata only, then hash."""
    b = io.BytesIO(save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    (n,) = struct.unpack("<Q", b.read(8))
    b.seek(8 + n)
    model = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    return model, legacy


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_values_and_dtype(tmp_path, dtype):
    modules = make_modules("sd1", scope="locon", rank=3, alpha=1.5)
    out = tmp_path / "out.safetensors"
    save_lora(modules, out, dtype=parse_dtype(dtype), arch="sd1")
    back = read_lora(out)
    assert back.arch == "sd1"
    torch_dtype = parse_dtype(dtype)
    for m in modules:
        got = back.modules[m.name]
        assert got.up.dtype == torch_dtype and got.up.shape == m.up.shape and got.down.shape == m.down.shape
        assert torch.equal(got.up, m.up.to(torch_dtype)) and torch.equal(got.down, m.down.to(torch_dtype))
        assert got.alpha == 1.5  # alpha is stored in fp32 whatever the factor dtype
    assert load_file(out)[f"{modules[0].name}.alpha"].dtype == torch.float32


def test_metadata_files_the_lora_under_its_sd_version(tmp_path):
    out = tmp_path / "xl.safetensors"
    mods = make_modules("sdxl", scope="attention", only="attn2_to_k", rank=4, alpha=2)
    save_lora(mods, out, arch="sdxl", metadata={"lora_merger_recipe": "{}"})
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_output_name"] == "xl" and meta["lora_merger_recipe"] == "{}"
    out2 = tmp_path / "sd2.safetensors"
    mods[0].down = mods[0].down[:2]
    mods[0].up = mods[0].up[:, :2]
    save_lora(mods, out2, arch="sd2")
    with safe_open(out2, "pt") as f:
        meta = f.metadata()
    assert meta["ss_v2"] == "True" and meta["ss_network_dim"] == "Dynamic"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_hashes_are_computed_over_the_written_bytes(tmp_path, dtype):
    # big enough that the legacy hash window (1 MiB .. 1 MiB + 64 KiB) lies in tensor data
    mods = make_modules("sd1", scope="locon", rank=8, only="down_blocks_[01]")
    out = tmp_path / "h.safetensors"
    meta = save_lora(mods, out, dtype=dtype, arch="sd1").metadata
    assert out.stat().st_size > 0x110000
    assert meta["sshs_model_hash"] == hashlib.sha256(data_section(out)).hexdigest()  # what A1111/Civitai compute
    tensors = load_file(out)
    model, legacy = kohya_hashes(tensors, meta)
    assert meta["sshs_model_hash"] == model and meta["sshs_legacy_hash"] == legacy


def test_the_hash_thread_runs_behind_the_writes_and_stops_when_a_write_fails(tmp_path, monkeypatch):
    """sha256 runs on its own thread at most BEHIND bytes after the writes: made tiny here, so the writer waits
    for it tensor after tensor; the digest is still that of the data. A producer failing mid-file stops it."""
    import threading

    monkeypatch.setattr(safetensors_io._HashTap, "BEHIND", 1)
    mods = make_modules("sd1", scope="locon", rank=8, only="down_blocks_[01]")
    out = tmp_path / "h.safetensors"
    meta = save_lora(mods, out, dtype=torch.float16, arch="sd1").metadata
    assert meta["sshs_model_hash"] == hashlib.sha256(data_section(out)).hexdigest()

    def boom():
        raise RuntimeError("disk on fire")

    specs = [safetensors_io.spec_of(f"t{i}", torch.full((1000,), float(i))) for i in range(5)]
    specs.append(safetensors_io.TensorSpec("t9", torch.float32, (2,), boom))
    with pytest.raises(RuntimeError, match="disk on fire"):
        safetensors_io.write_safetensors(tmp_path / "f.safetensors", specs, sshs=True)
    assert not (tmp_path / "f.safetensors").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["h.safetensors"]
    assert not [t for t in threading.enumerate() if t.name == "safetensors-hash"]


def test_our_bytes_match_the_reference_writer(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(3),
               "c": torch.zeros(2, dtype=torch.bfloat16), "i": torch.arange(3)}
    out = tmp_path / "x.safetensors"
    specs = [safetensors_io.spec_of(k, v) for k, v in tensors.items()]
    safetensors_io.write_safetensors(out, specs, {"ss_k": "v é"})
    assert out.read_bytes() == save(tensors, {"ss_k": "v é"})


def test_never_overwrites_without_permission_and_leaves_no_temp(tmp_path):
    mods = make_modules("sd1", scope="attention", only="attn1_to_q")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(LoraMergeError, match="exists"):
        save_lora(mods, out, arch="sd1")
    assert out.read_bytes() == b"precious"
    save_lora(mods, out, arch="sd1", overwrite=True)
    assert read_lora(out).modules.keys() == {m.name for m in mods}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_failure_while_writing_removes_the_temp_file(tmp_path):
    def boom():
        raise RuntimeError("disk on fire")

    spec = safetensors_io.TensorSpec("x", torch.float32, (2,), boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        safetensors_io.write_safetensors(tmp_path / "f.safetensors", [spec])
    assert list(tmp_path.iterdir()) == []


def test_header_is_valid_json_padded_to_8_bytes(tmp_path):
    out = tmp_path / "p.safetensors"
    save_lora(make_modules("sd1", scope="attention", only="attn1_to_q"), out, arch="sd1")
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["ss_network_module"] == "networks.lora"


def test_unknown_dtype_is_a_user_error():
    with pytest.raises(LoraMergeError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8")
