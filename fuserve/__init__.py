"""fuserve: serve LLMs on a Ray cluster, fast."""

from fuserve.configs import ConfigError, FuserveConfig, load_config
from fuserve.llm import LLM, Completion, CompletionOutput
from fuserve.sampling_params import RequestError, SamplingParams

__all__ = [
    "LLM",
    "Completion",
    "CompletionOutput",
    "ConfigError",
    "FuserveConfig",
    "RequestError",
    "SamplingParams",
    "load_config",
]
