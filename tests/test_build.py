"""`fuserve build`: per-rank files that are fused, sharded and quantized, byte-identical on rebuild, that
serve exactly as converting the same checkpoint on load does, and a manifest that refuses a config it
does not fit."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from safetensors import safe_open

from fuserve import LLM, SamplingParams
from fuserve.cli import main as cli_main
from fuserve.configs import config_from_dict
from fuserve.parallel.tp_context import TPContext
from fuserve.workers.kernels.ops import KernelOps
from fuserve.workers.models.build_manifest import MANIFEST_NAME, BuildManifest
from fuserve.workers.models.checkpoint_build import build_checkpoint
from fuserve.workers.models.loader import build_model, load_built_rank, resolve_source
from fuserve.workers.models.perplexity import score_text
from fuserve.workers.models.quant_scheme import SCHEMES

# prompts of 5 and 20 tokens: the 20-token prefill runs fp8 W8A8 with quantized activations (>= 16 rows)
PROMPTS = [[1, 2, 3, 4, 5], list(range(40, 60))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "llama3", "llama3", seed=1)


def _serve(path: Path, **model: object) -> list[list[int]]:
    config = config_from_dict(
        {
            "model": {"path": str(path), "max_model_len": 128, **model},
            "cache": {"block_size": 4, "num_blocks": 64},
        }
    )
    return [r.outputs[0].token_ids for r in LLM(config).generate(PROMPTS, GREEDY)]


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("scheme", ["int8-wo", "fp8"])
def test_build_twice_is_byte_identical_and_serves_as_converting_on_load(
    checkpoint: Path, tmp_path: Path, scheme: str
) -> None:
    assert cli_main([
        "build", str(checkpoint), "--out", str(tmp_path / "a"), "--quant", scheme, "--dtype", "float32"
    ]) == 0  # fmt: skip
    build_checkpoint(str(checkpoint), tmp_path / "b", 1, scheme, "float32")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    manifest = BuildManifest.read(tmp_path / "a")
    assert manifest.quantization == scheme and manifest.tensor_parallel_size == 1
    assert "model.layers.0.self_attn.qkv_proj.weight_scale" in manifest.scales["tensors"]
    assert manifest.tensors[0]["model.layers.1.mlp.gate_up_proj.weight"] == {
        "shape": [320, 64],  # gate and up fused
        "dtype": "int8" if scheme == "int8-wo" else "float8_e4m3fn",
    }
    built = _serve(tmp_path / "a")
    assert built == _serve(checkpoint, quantization=scheme)
    assert built != _serve(checkpoint)  # the 8-bit weights do change this random model's tokens


def test_tp2_rank_files_hold_each_ranks_shard(checkpoint: Path, tmp_path: Path) -> None:
    """Each rank file equals what rank r of 2 loads and quantizes from the HF folder, and loads back
    into a rank-r model unchanged."""
    build_checkpoint(str(checkpoint), tmp_path / "tp2", 2, "int8-wo", "float32")
    hf = resolve_source(config_from_dict({"model": {"path": str(checkpoint)}}).model)
    for rank in range(2):
        tp = TPContext(rank=rank, size=2)
        args = (tp, KernelOps.reference(), torch.float32, torch.device("cpu"), 8)
        want = build_model(hf, *args, quant=SCHEMES["int8-wo"])
        with safe_open(str(tmp_path / "tp2" / f"rank-{rank}.safetensors"), framework="pt") as f:
            for name, p in want.named_parameters():
                assert torch.equal(f.get_tensor(name), p.data), name
        got = build_model(hf, *args, quant=SCHEMES["int8-wo"])
        for p in got.parameters():
            p.data.zero_()
        load_built_rank(got, tmp_path / "tp2" / f"rank-{rank}.safetensors", torch.device("cpu"))
        for (name, a), (_, b) in zip(want.named_parameters(), got.named_parameters(), strict=True):
            assert torch.equal(a.data, b.data), name
    # 4 query and 2 KV heads of 16 split over 2 ranks: (2 + 1 + 1) heads of QKV rows each
    assert want.model.layers[0].self_attn.qkv_proj.weight.shape == ((2 + 1 + 1) * 16, 64)


@pytest.mark.parametrize(
    "tp, model, match",
    [
        (2, {}, "built for tensor_parallel_size 2, but parallel.tensor_parallel_size is 1"),
        (
            1,
            {"quantization": "fp8-wo"},
            "built with quantization 'int8-wo', but model.quantization is 'fp8-wo'",
        ),
        (1, {"max_model_len": 300}, "built for max_model_len 256, but model.max_model_len is 300"),
        (1, {"build_source": "OTHER"}, "built from another source"),
        (1, {"quantize_lm_head": True}, "a folder from `fuserve build` keeps its LM head in 16 bits"),
    ],
)
def test_mismatched_manifest_is_refused(
    checkpoint: Path, tmp_path: Path, tp: int, model: dict[str, object], match: str
) -> None:
    out = tmp_path / "built"
    build_checkpoint(str(checkpoint), out, tp, "int8-wo", "float32", max_model_len=256)
    if model.get("build_source") == "OTHER":
        model = {"build_source": str(make_checkpoint(tmp_path / "other", "llama3", seed=2))}
    with pytest.raises(ValueError, match=match):
        LLM(config_from_dict({"model": {"path": str(out), **model}, "cache": {"num_blocks": 64}}))
    if tp == 1:  # what does match is served: the same scheme, context and source
        ok = {"quantization": "int8-wo", "max_model_len": 256, "build_source": str(checkpoint)}
        llm = LLM(config_from_dict({"model": {"path": str(out), **ok}, "cache": {"num_blocks": 64}}))
        assert len(llm.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_build_for_an_fp8_kv_cache_and_a_missing_source(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli_main(["build", str(checkpoint), "--out", str(tmp_path / "x"), "--kv-cache", "fp8"]) == 0
    assert "KV cache fp8" in capsys.readouterr().out
    llm = LLM(config_from_dict({"model": {"path": str(tmp_path / "x")}, "cache": {"num_blocks": 64}}))
    assert llm.engine.executor.worker.kv_cache.k[0].dtype == torch.float8_e4m3fn  # `auto`: the build's
    assert len(llm.generate([PROMPTS[1]], GREEDY)[0].outputs[0].token_ids) == GREEDY.max_tokens
    build_checkpoint(str(checkpoint), tmp_path / "z")  # built for the model dtype's cache
    with pytest.raises(
        ValueError, match="built for kv_cache_dtype 'auto', but cache.kv_cache_dtype is 'fp8'"
    ):
        LLM(config_from_dict({"model": {"path": str(tmp_path / "z")}, "cache": {"kv_cache_dtype": "fp8"}}))
    assert cli_main(["build", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "y" / MANIFEST_NAME).exists()


def test_fp8_kv_scales_calibrated_at_build_are_served(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--kv-cache fp8` calibrates the per-head K/V scales once, on the shipped text through the
    checkpoint's tokenizer and on the start-up's random tokens, into the rank files (byte-identical on
    rebuild; a TP 2 build splits the same scales by head); serving the folder loads them and runs no
    start-up calibration (and says so); it keeps the FP8 KV cache's tolerances against the
    full-precision cache (tests/test_fp8_kv_cache.py), as the start-up calibration does."""
    build_checkpoint(str(checkpoint), tmp_path / "a", 1, "int8-wo", "float32", kv_cache_dtype="fp8")
    build_checkpoint(str(checkpoint), tmp_path / "b", 1, "int8-wo", "float32", kv_cache_dtype="fp8")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    kv_scales = BuildManifest.read(tmp_path / "a").kv_scales
    calibration = (
        "the first 256 tokens of kv_calibration.txt and 256 random tokens (seed 0), the larger amax per head"
    )
    assert kv_scales["calibration"] == calibration
    names = [f"model.layers.{i}.self_attn.{kv}_scale" for i in range(2) for kv in "kv"]
    assert kv_scales["tensors"] == names
    with safe_open(str(tmp_path / "a" / "rank-0.safetensors"), framework="pt") as f:
        built = {n: f.get_tensor(n) for n in names}
    assert all(t.shape == (2,) and t.dtype == torch.float32 and (t != 1).all() for t in built.values())
    build_checkpoint(str(checkpoint), tmp_path / "tp2", 2, "int8-wo", "float32", kv_cache_dtype="fp8")
    for rank in range(2):  # 2 KV heads over 2 ranks: one head each
        with safe_open(str(tmp_path / "tp2" / f"rank-{rank}.safetensors"), framework="pt") as f:
            assert all(torch.equal(f.get_tensor(n), built[n][rank : rank + 1]) for n in names)

    from fuserve.workers import worker

    calibrations: list[str] = []
    calibrate = worker.calibrate_kv_scales
    monkeypatch.setattr(worker, "calibrate_kv_scales", lambda *a: calibrations.append("run") or calibrate(*a))

    def llm(path: Path, kv_cache_dtype: str, **model: object) -> LLM:
        cache = {"block_size": 4, "num_blocks": 64, "kv_cache_dtype": kv_cache_dtype}
        return LLM(
            config_from_dict({"model": {"path": str(path), "max_model_len": 128, **model}, "cache": cache})
        )

    with caplog.at_level(logging.INFO, logger="fuserve"):
        served = llm(tmp_path / "a", "fp8")
    assert f"FP8 KV scales: from the build ({calibration})" in caplog.text and not calibrations
    start_up = llm(checkpoint, "fp8", quantization="int8-wo")
    assert calibrations == ["run"]
    full = llm(checkpoint, "auto", quantization="int8-wo")
    workers = [x.engine.executor.worker for x in (served, start_up, full)]
    assert [w.kv_scales_from for w in workers] == ["build", "start-up", None]
    layer_pairs = zip(workers[0].model.model.layers, workers[1].model.model.layers, strict=True)
    for i, (layer, other) in enumerate(layer_pairs):
        for kv in "kv":
            scale = getattr(layer.self_attn, f"{kv}_scale")
            assert torch.equal(scale, built[f"model.layers.{i}.self_attn.{kv}_scale"])
            # the build's amax covers the start-up's random tokens too (up to the fp32 sums' order)
            assert (scale >= getattr(other.self_attn, f"{kv}_scale") * (1 - 1e-5)).all()

    # the FP8 KV cache's tolerances against the full-precision cache, for either calibration
    text = list(range(1, 120))
    nll_full, top_full = score_text(workers[2].model, text)
    for w in workers[:2]:
        nll, top = score_text(w.model, text)
        assert float(nll.mean()) == pytest.approx(float(nll_full.mean()), rel=0.01)
        assert float((top == top_full).float().mean()) >= 0.9
    # test_fp8_kv_cache's prompts (PROMPTS[0] meets a near tie at its first token: logits 5e-4 apart)
    prompts = [list(range(1, 30)), [5, 6, 7], list(range(100, 160))]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [r.outputs[0].token_ids for r in full.generate(prompts, params)]
    for fp8 in (served, start_up):
        got = [r.outputs[0].token_ids for r in fp8.generate(prompts, params)]
        for g, w in zip(got, want, strict=True):  # near-uniform random logits drift apart later
            assert len(g) == 24 and g[:8] == w[:8]


@pytest.mark.slow
def test_tp2_built_folder_serves_as_tp2_converting_on_load(checkpoint: Path, tmp_path: Path) -> None:
    """Through a real two-rank group (Ray actors, gloo): each rank copies its own file onto its device;
    the tokens equal converting the HF folder on load with the same scheme at the same TP size. Built
    for an FP8 KV cache, each rank takes its own heads' scales from its file (no start-up calibration)
    and keeps the full-precision cache's greedy tokens where they are not a near tie."""
    import os

    import ray

    build_checkpoint(str(checkpoint), tmp_path / "tp2", 2, "int8-wo", "float32")
    build_checkpoint(str(checkpoint), tmp_path / "tp2-fp8kv", 2, "int8-wo", "float32", kv_cache_dtype="fp8")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    pythonpath = os.environ.get("PYTHONPATH", "")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}} if pythonpath else None,
    )
    try:
        tokens = []
        for path, model, kv in (
            (tmp_path / "tp2", {}, "auto"),
            (checkpoint, {"quantization": "int8-wo"}, "auto"),
            (tmp_path / "tp2-fp8kv", {}, "fp8"),
        ):
            config = {
                "model": {"path": str(path), "max_model_len": 128, **model},
                "cache": {"block_size": 4, "num_blocks": 48, "kv_cache_dtype": kv},
                "parallel": {"tensor_parallel_size": 2, "init_timeout_s": 60},
            }
            llm = LLM(config_from_dict(config))
            tokens.append([r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY)])
            llm.engine.shutdown()
        assert tokens[0] == tokens[1]
        # the FP8 KV cache against the full-precision one: the 20-token prompt's tokens agree; the 5-token
        # prompt's first token is a near tie (logits 5e-4 apart, which TP 2's int8 shards already flip)
        assert tokens[2][1] == tokens[1][1]
    finally:
        ray.shutdown()
