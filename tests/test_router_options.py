"""The router a config names reaches Serve as its request router's kwargs: length-aware, and the
prefix-affinity baseline with its imbalance threshold (Ray Serve LLM's `imbalanced_threshold`)."""

from __future__ import annotations

import pytest

from fuserve.cluster.deployment_options import engine_options
from fuserve.configs import FuserveConfig


def _kwargs(serve: dict) -> dict | None:
    config = FuserveConfig.model_validate({"serve": serve})
    return engine_options(config)["request_router_config"].request_router_kwargs


def test_each_router_reaches_serves_request_router() -> None:
    assert _kwargs({"router": "length_aware"}) == {"policy": "ttft"}
    assert _kwargs({"router": "prefix_affinity"}) == {"policy": "prefix_affinity"}
    assert _kwargs({"router": "prefix_affinity", "prefix_affinity_imbalance": 16}) == {
        "policy": "prefix_affinity",
        "imbalanced_threshold": 16.0,
    }
    assert not _kwargs({"router": "pow2"}), "pow2 is Serve's own router, with no kwargs of ours"


def test_a_negative_imbalance_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix_affinity_imbalance"):
        FuserveConfig.model_validate(
            {"serve": {"router": "prefix_affinity", "prefix_affinity_imbalance": -1}}
        )


def test_the_kwargs_are_what_the_router_takes() -> None:
    """Serve passes them to `initialize_state` by name: a misspelt one would fail only in a replica."""
    import inspect

    from fuserve.router.length_aware_router import LengthAwareRouter

    params = inspect.signature(LengthAwareRouter.initialize_state).parameters
    kwargs = _kwargs({"router": "prefix_affinity", "prefix_affinity_imbalance": 4})
    assert kwargs is not None and set(kwargs) <= set(params)
