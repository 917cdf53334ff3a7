"""The fast paths give the same results as the plain ones: batched svd, kernel-side copies, the hash cache."""

from __future__ import annotations

import errno
import math
import os

import pytest
import torch
from synth import make_modules, write_kohya

from lib_loramerge.cli import main
from lib_loramerge.formats import hashing, safetensors_io
from lib_loramerge.ops import merge as merge_mod
from lib_loramerge.ops.lowrank import FAST_TOLERANCE, Scratch, batched_svd, factor_svd
from lib_loramerge.synthetic import write_random_checkpoint


def _orthonormal(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=gen))[0]


def _stack(n: int, k: int, r: int, kappa: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """up (n, r), down (r, k) with singular values of each spread over ``kappa``."""
    s = torch.logspace(0, -math.log10(kappa), r, dtype=torch.float64)
    up = (_orthonormal(n, r, gen) * s) @ _orthonormal(r, r, gen).T
    down = (_orthonormal(k, r, gen) * s) @ _orthonormal(r, r, gen).T
    return up.float(), down.T.float()


def test_batched_svd_matches_the_float64_route_and_declines_ill_conditioned_stacks():
    gen = torch.Generator().manual_seed(7)
    pairs = [_stack(96, 160, 12, kappa, gen) for kappa in (1, 3, 10, 1e5)]
    ups, downs = torch.stack([u for u, _ in pairs]), torch.stack([d for _, d in pairs])
    batch = batched_svd(ups, downs, [6] * 4, 1e-7 * 12)
    assert all(math.isfinite(f) and f > 0 for f in batch.floors)
    assert batch.accepted == [0, 1, 2]  # condition 1e5 on both sides: the fast route cannot vouch for the last
    lefts, rights = batch.vectors(6)
    for i, (up, down) in enumerate(pairs[:3]):
        values, left, right = batch.values[i], lefts[i], rights[i]
        truth = torch.linalg.svdvals(up.double() @ down.double())
        reference = factor_svd(up, down, 6)
        assert float(((values[:6] - truth[:6]).abs() / truth[:6]).max()) <= FAST_TOLERANCE
        assert torch.allclose(values, reference.values, rtol=1e-5, atol=1e-9 * float(truth[0]))
        rebuilt = (left.double() * values[:6]) @ right.double()
        error = float((up.double() @ down.double() - rebuilt).norm())
        optimal = float(truth[6:].square().sum().sqrt())  # Eckart–Young: no rank-6 matrix does better
        assert error <= optimal * (1 + 1e-6) + 1e-6 * float(truth[0])


def test_a_merge_through_batches_equals_the_module_by_module_merge(tmp_path, capsys, monkeypatch):
    a = write_kohya(tmp_path / "a.safetensors", make_modules("sd1", rank=4, seed=1, only="down_blocks_1|layers_1_"))
    b = write_kohya(tmp_path / "b.safetensors", make_modules("sd1", rank=6, seed=2, only="down_blocks_1|layers_1_"))
    argv = ["merge", "--models", str(a), str(b), "--ratios", "0.8", "-0.4", "--rank", "5", "--dtype", "fp32"]
    assert main([*argv, "--out", str(tmp_path / "batched.safetensors")]) == 0
    monkeypatch.setattr(merge_mod, "_batchable", lambda parts, options: False)
    assert main([*argv, "--out", str(tmp_path / "single.safetensors")]) == 0
    from lib_loramerge.formats.reader import read_lora

    batched, single = read_lora(tmp_path / "batched.safetensors"), read_lora(tmp_path / "single.safetensors")
    assert batched.modules.keys() == single.modules.keys()
    for name, m in batched.modules.items():
        want = single.modules[name].delta().double()
        assert float((m.delta().double() - want).norm() / want.norm()) < 1e-5, name
    capsys.readouterr()


def _bake(tmp_path, name: str) -> bytes:
    ckpt = tmp_path / "base.safetensors"
    if not ckpt.exists():
        write_random_checkpoint(ckpt, "sd1", width_divisor=8, vae=False, seed=2)
        write_kohya(tmp_path / "l.safetensors", make_modules("sd1", rank=3, seed=4, width_divisor=8))
    out = tmp_path / name / "baked.safetensors"  # one output name: the recipe's custom_name is the name
    out.parent.mkdir()
    assert main(["bake", "--checkpoint", str(ckpt), "--models", str(tmp_path / "l.safetensors"),
                 "--out", str(out)]) == 0
    return out.read_bytes()


def test_the_copy_falls_back_to_sendfile_and_to_reads_with_the_same_bytes(tmp_path, capsys, monkeypatch):
    fast = _bake(tmp_path, "fast.safetensors")

    def exdev(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", exdev, raising=False)
    assert _bake(tmp_path, "sendfile.safetensors") == fast
    monkeypatch.setattr(os, "sendfile", lambda *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "no")), raising=False)
    assert _bake(tmp_path, "read.safetensors") == fast
    monkeypatch.setattr(safetensors_io, "PREFETCH_BYTES", 1)  # the producer may run no tensor ahead
    assert _bake(tmp_path, "tight.safetensors") == fast
    capsys.readouterr()


def test_the_checkpoint_hash_is_cached_by_path_size_and_mtime(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(hashing.CACHE_ENV, str(tmp_path / "cache"))
    hashed = []
    real = hashing.file_sha256

    def counting(path, start=0):
        hashed.append(os.fspath(path))
        return real(path, start)

    monkeypatch.setattr(hashing, "file_sha256", counting)
    _bake(tmp_path, "one.safetensors")
    ckpt = str(tmp_path / "base.safetensors")
    assert hashed.count(ckpt) == 1
    _bake(tmp_path, "two.safetensors")
    assert hashed.count(ckpt) == 1  # known: not read again
    stat = os.stat(ckpt)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # "changed"
    _bake(tmp_path, "three.safetensors")
    assert hashed.count(ckpt) == 2
    monkeypatch.setenv(hashing.CACHE_ENV, "off")
    _bake(tmp_path, "four.safetensors")
    assert hashed.count(ckpt) == 3
    capsys.readouterr()


@pytest.mark.parametrize("broken", [b"", b"{not json", b"[1, 2]"])
def test_a_broken_hash_cache_is_ignored(tmp_path, monkeypatch, broken):
    monkeypatch.setenv(hashing.CACHE_ENV, str(tmp_path))
    (tmp_path / "hashes.json").write_bytes(broken)
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert hashing.BackgroundHashes([f], whole=True).result() == hashing.file_sha256(f)
    assert hashing.HashCache(hashing.cache_file()).get(f, True) == hashing.file_sha256(f)  # rewritten, usable


def _mixed_inputs(tmp_path):
    """Two fp16 LoRAs whose modules differ in rank (so a batch cannot assume one layout), one with a module
    the other lacks, one with a Tucker conv module (LyCORIS LoCon)."""
    only = "down_blocks_1|layers_1_|conv_in"
    a = make_modules("sd1", rank=4, seed=1, only=only)
    b = make_modules("sd1", rank=6, seed=2, only=only)
    for i, m in enumerate(a):  # ranks 4 and 3 alternate within one layer shape
        if i % 2:
            a[i] = type(m)(m.name, m.up[:, :3].clone(), m.down[:3].clone(), 3.0)
    b = b[1:]  # b lacks a's first module
    conv = next(i for i, m in enumerate(b) if m.down.ndim == 4 and m.down.shape[2] == 3)
    m = b[conv]
    rank = m.down.shape[0]
    mid = torch.randn(rank, rank, 3, 3, generator=torch.Generator().manual_seed(3)) * 0.1
    b[conv] = type(m)(m.name, m.up, m.down[:, :, :1, :1].clone() * 0.3, m.alpha, mid=mid)
    return (write_kohya(tmp_path / "a.safetensors", a, torch.float16),
            write_kohya(tmp_path / "b.safetensors", b, torch.float16))


def test_batches_of_modules_with_different_input_ranks_a_missing_module_and_tucker_equal_the_plain_merge(
        tmp_path, capsys, monkeypatch):
    """The batched route (input ranks grouped, files read into staging memory, strengths applied to the Grams)
    against the module-by-module float64 route, and against the exact dense truncated SVD."""
    from lib_loramerge.formats.reader import read_lora

    a, b = _mixed_inputs(tmp_path)
    argv = ["merge", "--models", str(a), str(b), "--ratios", "0.8", "-0.6", "--rank", "5", "--dtype", "fp32"]
    assert main([*argv, "--out", str(tmp_path / "batched.safetensors")]) == 0
    monkeypatch.setattr(merge_mod, "_batchable", lambda parts, options: False)
    assert main([*argv, "--out", str(tmp_path / "single.safetensors")]) == 0
    capsys.readouterr()
    la, lb = read_lora(a), read_lora(b)
    batched, single = read_lora(tmp_path / "batched.safetensors"), read_lora(tmp_path / "single.safetensors")
    assert batched.modules.keys() == single.modules.keys() == la.modules.keys()
    for name, m in batched.modules.items():
        want = single.modules[name].delta().double()
        assert float((m.delta().double() - want).norm() / want.norm()) < 1e-5, name
        exact = 0.8 * la.modules[name].delta().double()
        if name in lb.modules:
            exact = exact - 0.6 * lb.modules[name].delta().double()
        flat = exact.reshape(exact.shape[0], -1)
        sv = torch.linalg.svdvals(flat)
        optimal = float(sv[5:].square().sum().sqrt())  # Eckart–Young: no rank-5 matrix does better
        error = float((m.delta().double().reshape(flat.shape) - flat).norm())
        assert error <= optimal * (1 + 1e-5) + 1e-6 * float(sv[0]), name


def test_batched_svd_applies_column_scales_as_if_the_factors_were_scaled():
    gen = torch.Generator().manual_seed(11)
    pairs = [_stack(80, 120, 10, 3.0, gen) for _ in range(3)]
    ups, downs = torch.stack([u for u, _ in pairs]), torch.stack([d for _, d in pairs])
    up_scale = torch.rand(3, 10, generator=gen, dtype=torch.float64) * 2 - 1
    down_scale = up_scale.abs()
    batch = batched_svd(ups, downs, [4] * 3, 1e-7 * 10, (up_scale, down_scale))
    assert batch.accepted == [0, 1, 2]
    left, right = batch.vectors(4)
    for i, (up, down) in enumerate(pairs):
        target = (up.double() * up_scale[i]) @ (down_scale[i][:, None] * down.double())
        truth = torch.linalg.svdvals(target)
        assert float(((batch.values[i, :4] - truth[:4]).abs() / truth[:4]).max()) <= FAST_TOLERANCE
        rebuilt = (left[i].double() * batch.values[i, :4]) @ right[i].double()
        assert float((target - rebuilt).norm()) <= float(truth[4:].square().sum().sqrt()) * (1 + 1e-5) + 1e-6 * float(truth[0])


def test_scratch_memory_is_reused_and_grows():
    scratch = Scratch()
    first = scratch.take("up", (4, 8))
    again = scratch.take("up", (2, 8), torch.float16)  # smaller, another dtype: the same memory
    assert again.data_ptr() == first.data_ptr() and again.dtype == torch.float16 and again.shape == (2, 8)
    bigger = scratch.take("up", (64, 64))
    assert bigger.shape == (64, 64) and bigger.is_contiguous()
    assert scratch.take("down", (4, 8)).data_ptr() != scratch.take("up", (4, 8)).data_ptr()


def test_reading_a_tensor_into_a_buffer_gives_the_same_values_and_checks_the_buffer(tmp_path):
    from lib_loramerge.errors import LoraMergeError
    from lib_loramerge.formats.tensorfile import open_tensor_file

    path = write_kohya(tmp_path / "a.safetensors", make_modules("sd1", rank=3, seed=5, only="layers_1_"), torch.float16)
    with open_tensor_file(path) as tf:
        key = next(k for k in tf.infos if k.endswith("lora_down.weight"))
        info = tf.infos[key]
        buffer = torch.full(info.shape, 7.0, dtype=info.dtype)
        tf.read_into(key, buffer)
        assert torch.equal(buffer, tf.get(key)) and not torch.equal(buffer, torch.full_like(buffer, 7.0))
        with pytest.raises(LoraMergeError, match="the buffer"):
            tf.read_into(key, torch.empty(info.shape, dtype=torch.float32))
        with pytest.raises(LoraMergeError, match="the buffer"):
            tf.read_into(key, torch.empty(info.shape[0] + 1, *info.shape[1:], dtype=info.dtype))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 64])  # truncated after its header was read
        with pytest.raises(LoraMergeError, match="changed on disk"):
            tf.read_into(key, buffer)


def test_the_cli_parser_is_built_without_torch_and_early_hashes_are_reused(tmp_path):
    """The CLI starts hashing its inputs before importing torch (which keeps a core busy for a second):
    building the parser must not import torch, and a job takes over hashes begun for the same files."""
    import subprocess
    import sys

    probe = "import sys; from lib_loramerge.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

    from lib_loramerge.formats.hashing import BackgroundHashes, data_sha256
    from lib_loramerge.formats.reader import read_lora
    from lib_loramerge.jobs import input_hashes

    a = write_kohya(tmp_path / "a.safetensors", make_modules("sd1", rank=2, seed=1, only="layers_1_"))
    b = write_kohya(tmp_path / "b.safetensors", make_modules("sd1", rank=2, seed=2, only="layers_1_"))
    lora_a, lora_b = read_lora(a), read_lora(b)
    early = BackgroundHashes([tmp_path / "." / "a.safetensors", b], cache=hashing.HashCache(None))
    assert input_hashes([lora_a, lora_b], early) is early  # the same files, spelled differently
    assert early.result(0) == data_sha256(a) and early.result(1) == data_sha256(b)
    assert input_hashes([lora_b, lora_a], early) is not early  # another order
    assert not early.covers([a, b], whole=True)  # checkpoints are hashed whole, LoRAs by data


def test_reading_many_tensors_at_once_fills_each_buffer_with_its_own_bytes(tmp_path, monkeypatch):
    """read_many_into: one open, adjacent tensors by one preadv, in any request order; without preadv
    (Windows) the seek-and-read path gives the same bytes."""
    import os as os_module

    from lib_loramerge.formats.tensorfile import open_tensor_file

    path = write_kohya(tmp_path / "a.safetensors", make_modules("sd1", rank=3, seed=6, only="layers_1_"), torch.float16)
    for preadv in (True, False):
        if not preadv:
            monkeypatch.delattr(os_module, "preadv", raising=False)
        with open_tensor_file(path) as tf:
            keys = [k for k in tf.infos if not k.endswith("alpha")][::-1]  # reversed: out of file order
            buffers = {k: torch.zeros(tf.infos[k].shape, dtype=tf.infos[k].dtype) for k in keys}
            tf.read_many_into(list(buffers.items()))
            assert all(torch.equal(buffers[k], tf.get(k)) for k in keys)
