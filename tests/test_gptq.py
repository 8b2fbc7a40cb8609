"""GPTQ (models/gptq.py): lower output error than round-to-nearest on correlated inputs, the same grid
and scales, and `fuserve build --calibrate gptq` byte-identical on rebuild with the manifest saying so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from safetensors import safe_open

from fuserve.cli import main as cli_main
from fuserve.workers.models.build_manifest import BuildManifest
from fuserve.workers.models.checkpoint_build import build_checkpoint
from fuserve.workers.models.gptq import gptq_quantize_rows, output_error
from fuserve.workers.models.quant_scheme import SCHEMES, quantize_rows


def _correlated_inputs(m: int, k: int, seed: int) -> torch.Tensor:
    """Inputs like a transformer's: channels mixed together, a few of them much larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) @ (torch.eye(k) + 2 * torch.randn(k, k, generator=g) / k**0.5)
    x[:, :4] *= 20
    return x


@pytest.mark.parametrize("scheme", ["int8-wo", "fp8-wo", "fp8"])
def test_gptq_output_error_is_below_round_to_nearest(scheme: str) -> None:
    x = _correlated_inputs(1024, 128, seed=0)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    h = x.double().T @ x.double() / x.shape[0]
    rtn = output_error(x, w, *quantize_rows(w, SCHEMES[scheme]))
    q, scale = gptq_quantize_rows(w, h, SCHEMES[scheme])
    assert q.dtype == SCHEMES[scheme].weight_dtype
    # ~0.4x of round-to-nearest's error here (the output error, not the weights')
    assert output_error(x, w, q, scale) < 0.6 * rtn


@pytest.mark.parametrize("scheme", ["int8-wo", "fp8-wo"])
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(scheme: str) -> None:
    """A diagonal H gives no column anything to compensate through: GPTQ's bytes are quantize_rows'
    (the same per-row scales, the same grid), and a never-seen input column is rounded to nearest."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    h = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5).double()
    h[5, 5] = 0.0
    q, scale = gptq_quantize_rows(w, h, SCHEMES[scheme])
    q0, scale0 = quantize_rows(w, SCHEMES[scheme])
    assert torch.equal(scale, scale0)
    assert torch.equal(q.view(torch.int8), q0.view(torch.int8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "llama3", "llama3", seed=1)


def test_build_with_gptq_is_byte_identical_and_recorded(checkpoint: Path, tmp_path: Path) -> None:
    argv = ["build", str(checkpoint), "--quant", "fp8-wo", "--dtype", "float32", "--calibrate", "gptq"]
    assert cli_main([*argv, "--out", str(tmp_path / "a")]) == 0
    build_checkpoint(str(checkpoint), tmp_path / "b", 1, "fp8-wo", "float32", calibrate="gptq")
    build_checkpoint(str(checkpoint), tmp_path / "rtn", 1, "fp8-wo", "float32")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    calibration = BuildManifest.read(tmp_path / "a").calibration
    assert calibration["method"] == "gptq" and calibration["tokens"] > 0
    assert BuildManifest.read(tmp_path / "rtn").calibration == {}
    with (
        safe_open(str(tmp_path / "a" / "rank-0.safetensors"), framework="pt") as g,
        safe_open(str(tmp_path / "rtn" / "rank-0.safetensors"), framework="pt") as r,
    ):
        assert list(g.keys()) == list(r.keys())
        name = "model.layers.0.mlp.down_proj.weight"
        assert g.get_tensor(name).dtype == torch.float8_e4m3fn
        assert torch.equal(g.get_tensor(name + "_scale"), r.get_tensor(name + "_scale"))
        assert not torch.equal(g.get_tensor(name).view(torch.int8), r.get_tensor(name).view(torch.int8))


def test_tp2_build_with_gptq_rounds_each_ranks_slice(checkpoint: Path, tmp_path: Path) -> None:
    """Under TP 2 a row-parallel layer holds half the input columns: it takes that block of H. Each
    rank's column-parallel rows are the TP 1 build's rows (GPTQ rounds rows independently)."""
    build_checkpoint(str(checkpoint), tmp_path / "tp1", 1, "int8-wo", "float32", calibrate="gptq")
    build_checkpoint(str(checkpoint), tmp_path / "tp2", 2, "int8-wo", "float32", calibrate="gptq")
    assert BuildManifest.read(tmp_path / "tp2").calibration["method"] == "gptq"
    name = "model.layers.1.mlp.gate_up_proj.weight"
    with safe_open(str(tmp_path / "tp1" / "rank-0.safetensors"), framework="pt") as f:
        full = f.get_tensor(name)
        down = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    inter = full.shape[0] // 2
    for rank in range(2):
        with safe_open(str(tmp_path / "tp2" / f"rank-{rank}.safetensors"), framework="pt") as f:
            half = inter // 2
            rows = torch.cat(
                [full[rank * half : (rank + 1) * half], full[inter + rank * half : inter + (rank + 1) * half]]
            )
            assert torch.equal(f.get_tensor(name), rows)
            assert f.get_tensor("model.layers.1.mlp.down_proj.weight").shape == (
                down.shape[0],
                down.shape[1] // 2,
            )


def test_calibrate_without_an_8bit_scheme_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="add --quant"):
        build_checkpoint(str(checkpoint), tmp_path / "x", 1, "none", "float32", calibrate="gptq")
