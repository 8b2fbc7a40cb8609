"""fuserve: serve LLMs on a Ray cluster, fast.

`LLM` (and its outputs) load on first use: they bring torch and the engine, which the processes that
only serve HTTP (a replica's frontend processes, router/frontend_processes.py) never need.
"""

from typing import TYPE_CHECKING, Any

from fuserve.configs import ConfigError, FuserveConfig, load_config
from fuserve.sampling_params import RequestError, SamplingParams

if TYPE_CHECKING:
    from fuserve.llm import LLM, Completion, CompletionOutput

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


def __getattr__(name: str) -> Any:
    if name in ("LLM", "Completion", "CompletionOutput"):
        from fuserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'fuserve' has no attribute {name!r}")
