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
from lib_loramerge.ops.lowrank import FAST_TOLERANCE, batched_factor_svd, factor_svd
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
    svds, floors = batched_factor_svd(ups, downs, [6] * 4, 1e-7 * 12)
    assert all(math.isfinite(f) and f > 0 for f in floors)
    assert svds[3] is None  # condition 1e5 on both sides: the fast route cannot vouch for it
    for (up, down), svd in zip(pairs[:3], svds[:3], strict=True):
        assert svd is not None
        truth = torch.linalg.svdvals(up.double() @ down.double())
        reference = factor_svd(up, down, 6)
        assert float(((svd.values[:6] - truth[:6]).abs() / truth[:6]).max()) <= FAST_TOLERANCE
        assert torch.allclose(svd.values, reference.values, rtol=1e-5, atol=1e-9 * float(truth[0]))
        rebuilt = (svd.left[:, :6].double() * svd.values[:6]) @ svd.right[:6].double()
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
