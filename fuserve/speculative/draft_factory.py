"""The engine core's draft proposer for `speculative.method: draft`, and how it finds its draft replica.

The engine core is no Ray worker: to look its draft up it joins the cluster as a driver (as it does
for tensor parallelism, from the RayPlacement its frontend passed) and asks the app's Draft deployment
through a Serve handle, once at start-up and again whenever the draft stopped answering. Never per step.
Which draft runs is the draft file's to say (`build_draft_runner`): an eagle1 file is a feature-reading
draft, whose rounds carry the target's features; anything else the independent draft model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from fuserve.configs import FuserveConfig
from fuserve.speculative.draft_client import DraftProposer
from fuserve.speculative.draft_messages import DraftAddress
from fuserve.speculative.feature_draft_file import is_feature_draft
from fuserve.workers.engine_core import RayPlacement

if TYPE_CHECKING:
    import torch

    from fuserve.speculative.draft_runner import DraftRunner
    from fuserve.speculative.feature_draft_runner import FeatureDraftRunner

LOOKUP_TIMEOUT_S = 10.0


def serve_locator(
    app_name: str, deployment: str, timeout_s: float = LOOKUP_TIMEOUT_S
) -> Callable[[], DraftAddress]:
    """Where a replica of `deployment` in the Serve app `app_name` listens; needs Ray initialized."""
    from ray import serve

    # The handle lives in an event loop of its own, on a thread of its own: the engine core inherits the
    # replica's RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, under which a handle called outside a running
    # loop refuses, and its router keeps calling back into the loop of its first call, so that loop stays.
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="draft-locator", daemon=True).start()
    handle = serve.get_deployment_handle(deployment, app_name=app_name)

    async def ask() -> object:
        return await handle.address.remote()

    def locate() -> DraftAddress:
        reply = asyncio.run_coroutine_threadsafe(ask(), loop).result(timeout_s)
        return msgspec.convert(reply, DraftAddress)

    return locate


def build_draft_proposer(config: FuserveConfig, placement: RayPlacement | None) -> DraftProposer:
    """Called in the engine core when `speculative.method` is `draft`. It returns at once: the lookup
    runs in the background and rounds raise ProposerUnavailable (k = 0) until it answers."""
    from fuserve.cluster.draft_deployment import DRAFT_DEPLOYMENT

    if placement is None or placement.app_name is None:
        raise ValueError(
            "speculative.method `draft` with a draft deployment runs under Ray Serve (`fuserve serve`); "
            "elsewhere set speculative.placement.in_engine: true to run the draft in the engine's process"
        )
    import ray

    if not ray.is_initialized():
        ray.init(address=placement.address, namespace=placement.namespace, log_to_driver=False)
    locate = serve_locator(placement.app_name, DRAFT_DEPLOYMENT)
    reads_features = is_feature_draft(config.speculative.draft)
    return DraftProposer(locate, config.speculative.channel_timeout_s, reads_features=reads_features)


def build_draft_runner(
    config: FuserveConfig, device: torch.device | None = None
) -> DraftRunner | FeatureDraftRunner:
    """The draft's runner: a feature-reading one for an eagle1 draft file, else the independent draft
    model's. In a draft deployment `device` is None (the placement says where); in the engine's
    process it is the target's."""
    from fuserve.speculative.draft_runner import DraftRunner
    from fuserve.speculative.feature_draft_runner import FeatureDraftRunner

    if device is not None:
        spec = config.speculative
        placement = spec.placement.model_copy(update={"device": device.type})
        config = config.model_copy(update={"speculative": spec.model_copy(update={"placement": placement})})

    if is_feature_draft(config.speculative.draft):
        return FeatureDraftRunner.from_config(config)
    if config.speculative.draft_confidence > 0.0:
        raise ValueError(
            "speculative.draft_confidence cuts a feature (eagle1) draft's drafts; the independent draft "
            f"{config.speculative.draft.path!r} has none: set it to 0"  # type: ignore[union-attr]
        )
    if config.speculative.second_best:
        raise ValueError(
            "speculative.second_best takes a feature (eagle1) draft's second-best tokens; the independent "
            f"draft {config.speculative.draft.path!r} offers none: set it to false"  # type: ignore[union-attr]
        )
    return DraftRunner.from_config(config)
