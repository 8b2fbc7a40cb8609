"""Autoscaling on the engines' outstanding tokens: the policy as Serve loads it (from the import path in
the Serve config, pickled by value), fed Serve's own AutoscalingContext; and the config that selects it."""

from __future__ import annotations

from typing import Any

import pytest

from fuserve.cluster.serve_config import TOKEN_POLICY, replica_override
from fuserve.configs import config_from_dict


def _context(
    outstanding: dict[str, float] | None, current: int, lo: int = 1, hi: int = 4, requests: float = 0.0
) -> Any:
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    dep = DeploymentID(name="Engine", app_name="fuserve")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(current)]
    metrics = (
        None
        if outstanding is None
        else {"outstanding_tokens": {replicas[int(k)]: v for k, v in outstanding.items()}}
    )
    return AutoscalingContext(
        deployment_id=dep,
        deployment_name="Engine",
        app_name="fuserve",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=replicas,
        total_num_requests=requests,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=AutoscalingConfig(min_replicas=lo, max_replicas=hi, target_ongoing_requests=8),
    )


def _policy_as_serve_loads_it(target: float) -> Any:
    """Serve's config model imports the path, pickles the class by value, and builds it with its kwargs."""
    from ray.serve.config import AutoscalingConfig

    override = replica_override(
        config_from_dict(
            {
                "serve": {
                    "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_outstanding_tokens": target}
                }
            }
        ).serve
    )
    serve_config = AutoscalingConfig(**override["autoscaling_config"])
    assert serve_config.policy.policy_function == TOKEN_POLICY
    cls = serve_config.policy.get_policy()
    return cls(**serve_config.policy.policy_kwargs)


def test_replicas_follow_the_outstanding_tokens_within_the_bounds() -> None:
    policy = _policy_as_serve_loads_it(target=1000)
    assert policy(_context({"0": 2500.0}, current=1))[0] == 3  # 2,500 tokens queued: 3 replicas
    assert policy(_context({"0": 900.0, "1": 1200.0}, current=2))[0] == 3
    assert policy(_context({"0": 100.0, "1": 0.0}, current=2))[0] == 1  # idle: down to one
    assert policy(_context({"0": 0.0, "1": 0.0}, current=2))[0] == 1  # never below min_replicas
    assert policy(_context({"0": 50_000.0}, current=1))[0] == 4  # never above max_replicas
    # A replica without reports (started before autoscaling was on): Serve's count of requests decides.
    assert policy(_context(None, current=2, requests=20.0))[0] == 3  # 20 requests / 8 per replica
    assert policy(_context({"0": 0.0}, current=2, requests=20.0))[0] == 3


def test_without_a_token_target_serve_keeps_its_own_policy() -> None:
    auto = config_from_dict({"serve": {"autoscaling": {"max_replicas": 3, "upscale_delay_s": 5}}}).serve
    options = replica_override(auto)["autoscaling_config"]
    assert "policy" not in options
    assert options["upscale_delay_s"] == 5 and options["max_replicas"] == 3


def test_a_bad_token_target_is_refused_naming_the_field() -> None:
    from fuserve.configs import ConfigError

    with pytest.raises(ConfigError, match="serve.autoscaling.target_outstanding_tokens"):
        config_from_dict({"serve": {"autoscaling": {"target_outstanding_tokens": 0}}})


def test_with_frontend_processes_replicas_follow_the_requests_the_engines_count() -> None:
    """Serve's own count misses every request a spawned frontend process takes: without a token target,
    such a deployment scales on the engine cores' request counts, with Serve's target per replica."""
    from ray.serve.config import AutoscalingConfig

    from fuserve.cluster.serve_config import REQUESTS_POLICY

    serve = config_from_dict(
        {
            "serve": {
                "ingress": "haproxy",
                "frontend_processes": 2,
                "autoscaling": {"max_replicas": 4, "target_ongoing_requests": 8},
            }
        }
    ).serve
    options = AutoscalingConfig(**replica_override(serve)["autoscaling_config"])
    assert options.policy.policy_function == REQUESTS_POLICY
    policy = options.policy.get_policy()(**options.policy.policy_kwargs)

    def requests(per_replica: dict[str, float], current: int, **kw: Any) -> int:
        ctx = _context(None, current, **kw)
        ctx.aggregated_metrics = {
            "engine_requests": {ctx.running_replicas[int(k)]: v for k, v in per_replica.items()}
        }
        return policy(ctx)[0]

    assert requests({"0": 20.0}, current=1) == 3  # 20 requests in the engine, 8 a replica
    assert requests({"0": 3.0, "1": 2.0}, current=2) == 1
    assert requests({"0": 200.0}, current=1) == 4  # max_replicas
    assert requests({"0": 9.0}, current=2, requests=30.0) == 4  # one replica unreported: Serve's count
    one = config_from_dict({"serve": {"autoscaling": {"max_replicas": 4}}}).serve
    assert "policy" not in replica_override(one)["autoscaling_config"]  # one process: Serve's own policy
