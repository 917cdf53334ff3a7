"""``analyze``: per-block norms and cosines from factors, against dense flattened updates written here."""

import json
import math

import pytest
import torch
from synth import make_modules, write_kohya

from lib_loramerge.blocks.mapping import block_of
from lib_loramerge.cli import main
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.model import LoraModule
from lib_loramerge.ops.analyze import analyze_loras


def dense(m):
    scale = m.alpha / m.down.shape[0] if m.alpha is not None else 1.0
    return scale * m.up.double().reshape(m.up.shape[0], -1) @ m.down.double().reshape(m.down.shape[0], -1)


@pytest.fixture
def pair(tmp_path):
    """Two SD1 LoRAs; b shares a's direction in up_blocks_3 (OUT09–OUT11) and lacks some modules."""
    a = make_modules("sd1", rank=3, seed=1, only="up_blocks_[23]|down_blocks_0|layers_0_")
    b = make_modules("sd1", rank=2, seed=2, only="up_blocks_[23]|layers_0_")
    by_name = {m.name: m for m in a}
    b = [LoraModule(m.name, m.up + by_name[m.name].up[:, :2], m.down + by_name[m.name].down[:2], m.alpha)
         if "up_blocks_3" in m.name else m for m in b]
    return (write_kohya(tmp_path / "a.safetensors", a), write_kohya(tmp_path / "b.safetensors", b))


def test_block_norms_and_cosines_match_dense(pair):
    loras = [read_lora(p, lazy=True) for p in pair]
    strengths = [0.8, -1.5]
    analysis = analyze_loras(loras, strengths)
    eager = [read_lora(p) for p in pair]
    flat: dict[str, list[list[torch.Tensor]]] = {}
    for k, lora in enumerate(eager):
        for name in set(eager[0].modules) | set(eager[1].modules):
            m = lora.modules.get(name)
            other = (eager[1 - k].modules.get(name))
            w = strengths[k] * dense(m) if m is not None else torch.zeros_like(dense(other))
            flat.setdefault(block_of(name, "sd1"), [[], []])[k].append(w.flatten())
    assert set(analysis.blocks) == set(flat)
    for block, (xs, ys) in flat.items():
        x, y = torch.cat(xs), torch.cat(ys)
        s = analysis.blocks[block]
        assert math.isclose(s.norm(0), float(x.norm()), rel_tol=1e-5)
        assert math.isclose(s.norm(1), float(y.norm()), rel_tol=1e-5, abs_tol=1e-9)
        if float(y.norm()) == 0:
            assert s.cosine(0, 1) is None
            continue
        assert math.isclose(s.cosine(0, 1), float(x @ y / (x.norm() * y.norm())), rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(s.overlap(0, 1), float(2 * x @ y / (x @ x + y @ y)), rel_tol=1e-5, abs_tol=1e-6)
    assert all(analysis.blocks[b].cosine(0, 1) < -0.3 for b in ("OUT09", "OUT10", "OUT11"))
    assert "OUT09" in analysis.summary() and "interfere" in analysis.summary()


def test_analyze_command_text_and_json(pair, capsys):
    assert main(["analyze", *map(str, pair)]) == 0
    out = capsys.readouterr().out
    assert "OUT10" in out and "cos 1·2" in out and "interfere in" in out
    assert main(["analyze", *map(str, pair), "--json", "--modules"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"] == ["a", "b"] and data["arch"] == "sd1"
    assert data["blocks"]["OUT11"]["pairs"][0]["cosine"] > 0.3 and data["modules"]


def test_analyze_needs_two_loras(pair, capsys):
    assert main(["analyze", str(pair[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "at least two" in err and len(err.strip().splitlines()) == 1


def test_three_loras_get_every_pair_and_a_cosine_matrix(pair, tmp_path, capsys):
    third = write_kohya(tmp_path / "c.safetensors", make_modules("sd1", rank=2, seed=7, only="up_blocks_3"))
    assert main(["analyze", *map(str, pair), str(third)]) == 0
    out = capsys.readouterr().out
    assert "cos 1·2" in out and "cos 1·3" in out and "cos 2·3" in out and "overall cosine, every pair" in out
