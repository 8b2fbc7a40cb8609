"""The draft as its own Serve deployment, on a real local Ray cluster.

`build_app` with `speculative.method: draft` runs a Draft deployment beside the Engine (the engine still
serves HTTP). A DraftProposer built as the engine core builds it (draft_factory.build_draft_proposer:
a Serve handle lookup, then ZMQ) drafts what the draft model drafts in-process, in the test's driver
and in a spawned process that joins the cluster from a RayPlacement, as the engine core does. The Draft
replica's actor killed (ray.kill): the next round raises ProposerUnavailable within the channel timeout, Serve
starts a new replica, the proposer finds it and drafting resumes, right, with no help from the engine.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from checkpoints import make_checkpoint

from fuserve.configs import FuserveConfig, config_from_dict
from fuserve.speculative.draft_runner import DraftRunner
from fuserve.speculative.proposer import ProposeRequest, ProposerUnavailable

if TYPE_CHECKING:
    from conftest import ServeCluster

APP = "spec"
TIMEOUT_S = 2.0  # generous: a loaded 2-core box


def _config(folder: Path) -> FuserveConfig:
    target = make_checkpoint(folder / "target", "llama3", vocab_size=260, max_position_embeddings=256)
    draft = make_checkpoint(folder / "draft", "llama3", vocab_size=260, seed=5, num_hidden_layers=1)
    return config_from_dict(
        {
            "model": {"path": str(target), "name": "tiny", "max_model_len": 256},
            "cache": {"num_blocks": 64},
            "speculative": {
                "method": "draft",
                "draft": {"path": str(draft), "max_model_len": 256},
                "channel_timeout_s": TIMEOUT_S,
                "placement": {"device": "cpu", "num_cpus": 0.5},
            },
        }
    )


def _draft_actor_names(app: str = APP) -> list[str]:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [n for n in names if n.startswith(f"SERVE_REPLICA::{app}#Draft#")]


def _propose_as_an_engine_core(config: FuserveConfig, placement, reqs: list[ProposeRequest], out) -> None:
    """In a spawned process with no Ray in it, as the engine core: join the cluster, find the draft."""
    from fuserve.speculative.draft_factory import build_draft_proposer

    proposer = build_draft_proposer(config, placement)
    assert proposer.wait_connected(60)
    out.put(proposer.propose(reqs))
    proposer.close()


def test_draft_deployment_serves_rounds_and_comes_back_after_a_kill(
    serve_cluster: ServeCluster, tmp_path: Path
) -> None:
    import ray
    from ray import serve

    from fuserve.cluster import build_app
    from fuserve.speculative.draft_factory import build_draft_proposer
    from fuserve.workers.engine_core import RayPlacement

    config = _config(tmp_path)
    serve.run(build_app(config, cluster_gpus=0), name=APP, route_prefix=f"/{APP}")
    body = {"prompt": "hi", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{serve_cluster.url}/{APP}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text  # the engine serves with its draft beside it

    ctx = ray.get_runtime_context()
    placement_args = (ctx.gcs_address, ctx.namespace, None, APP)
    proposer = build_draft_proposer(config, RayPlacement(*placement_args))
    oracle = DraftRunner.from_config(config)
    try:
        assert proposer.wait_connected(30)
        reqs = [ProposeRequest("a", 0, list(range(40, 60)), 4), ProposeRequest("b", 0, [7, 8, 9], 2)]
        first = proposer.propose(reqs)
        assert first == oracle.propose(reqs) and [len(d) for d in first] == [4, 2]

        # the same from a process of its own that joins the cluster, as the engine core does
        spawn = multiprocessing.get_context("spawn")
        out = spawn.Queue()
        reqs = [ProposeRequest("c", 0, [3, 1, 4, 1, 5], 3)]
        core = spawn.Process(
            target=_propose_as_an_engine_core, args=(config, RayPlacement(*placement_args), reqs, out)
        )
        core.start()
        assert out.get(timeout=120) == oracle.propose(reqs)
        core.join(30)
        oracle.release(["c"])

        [old] = _draft_actor_names()
        ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
        time.sleep(0.5)  # the actor's process is gone
        t0 = time.monotonic()
        with pytest.raises(ProposerUnavailable):
            proposer.propose([ProposeRequest("a", 20, [1], 4), ProposeRequest("b", 3, [2], 2)])
        assert time.monotonic() - t0 < TIMEOUT_S + 0.5

        # the engine goes on at k = 0, sending each step's tokens; drafting resumes by itself
        a, b = list(range(40, 60)) + [1], [7, 8, 9, 2]
        deadline = time.monotonic() + 90
        while True:
            reqs = [ProposeRequest("a", len(a), [3], 4), ProposeRequest("b", len(b), [4], 2)]
            a, b = a + [3], b + [4]
            try:
                got = proposer.propose(reqs)
                break
            except ProposerUnavailable:
                assert time.monotonic() < deadline, "drafting did not resume after the draft restarted"
                time.sleep(0.2)
        assert _draft_actor_names() != [old] and len(_draft_actor_names()) == 1
        oracle.release(["a", "b"])
        assert got == oracle.propose([ProposeRequest("a", 0, a, 4), ProposeRequest("b", 0, b, 2)])
        assert proposer.num_reconnects == 2
    finally:
        proposer.close()
        serve.delete(APP)


def test_draft_resources_follow_the_placement(tmp_path: Path) -> None:
    from fuserve.cluster.draft_deployment import draft_options

    config = _config(tmp_path)
    assert draft_options(config, cluster_gpus=8)["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    spec = config.speculative.model_copy(
        update={
            "placement": config.speculative.placement.model_copy(update={"device": "auto", "num_gpus": 0.25})
        }
    )
    shared = config.model_copy(update={"speculative": spec})
    assert draft_options(shared, cluster_gpus=1)["ray_actor_options"]["num_gpus"] == 0.25  # beside the target
    assert draft_options(shared, cluster_gpus=0)["ray_actor_options"]["num_gpus"] == 0.0  # a CPU cluster
    assert draft_options(shared)["num_replicas"] == config.serve.num_replicas


def _spec_counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}{{"))


def test_engine_speculates_through_its_draft_and_finishes_when_the_draft_dies(
    serve_cluster: ServeCluster, tmp_path: Path
) -> None:
    """The whole path: the engine core finds the Draft deployment, drafts through it every step, and
    the target keeps what the target would have said alone (the draft is the target's own copy, so it
    keeps nearly every draft, and its drafts made ahead during the verify answer rounds). The Draft
    replica killed mid-stream: the stream goes on at k = 0 and ends with the same text; Serve brings the
    draft back and the engine drafts through it again."""
    import ray
    from ray import serve

    from fuserve import LLM, SamplingParams
    from fuserve.cluster import build_app

    target = make_checkpoint(tmp_path / "target", "llama3", vocab_size=260, max_position_embeddings=256)
    model = {"path": str(target), "name": "tiny", "max_model_len": 256}
    plain = config_from_dict({"model": model, "cache": {"num_blocks": 64}})
    config = config_from_dict(
        {
            "model": model,
            "cache": {"num_blocks": 64},
            "speculative": {
                "method": "draft",
                "draft": {"path": str(target), "max_model_len": 256},
                "num_speculative_tokens": 3,
                "adaptive": False,
                "channel_timeout_s": TIMEOUT_S,
                "placement": {"device": "cpu", "num_cpus": 0.5},
                "draft_ahead": True,  # off by default on CPU; here the draft keeps nearly every round's guess
            },
        }
    )
    prompt, n = "The draft", 150
    want = LLM(plain).generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    want_text = want[0].outputs[0].text
    app = "spec-e2e"
    url = f"{serve_cluster.url}/{app}"
    serve.run(build_app(config, cluster_gpus=0), name=app, route_prefix=f"/{app}")
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    deadline = time.monotonic() + 90
    while _spec_counter(url, "fuserve_spec_accepted_tokens_total") == 0:  # the lookup runs in the background
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert want_text.startswith(r.json()["choices"][0]["text"])
        assert time.monotonic() < deadline, "the engine never drafted through its draft deployment"

    [old] = _draft_actor_names(app)
    text, killed = "", False
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "max_tokens": n, "stream": True}, timeout=120
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            if not killed and len(text) >= 10:
                ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
                killed = True
    assert killed and text == want_text  # the draft's loss cost no token and changed none
    # drafting ahead answered some rounds (the draft is the target: its guess of the next token is the
    # target's), and the text is still the target's own
    assert _spec_counter(url, "fuserve_spec_ahead_hits_total") > 0
    # a lone stream beside a draft that drafts ahead overlaps its rounds (speculative.draft_overlap unset)
    assert _spec_counter(url, "fuserve_spec_overlapped_rounds_total") > 0
    before = _spec_counter(url, "fuserve_spec_accepted_tokens_total")
    deadline = time.monotonic() + 120
    while _spec_counter(url, "fuserve_spec_accepted_tokens_total") <= before:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and want_text.startswith(r.json()["choices"][0]["text"])
        assert time.monotonic() < deadline, "drafting did not resume after Serve replaced the draft"
    serve.delete(app)


def test_an_in_engine_draft_serves_with_no_draft_deployment(
    serve_cluster: ServeCluster, tmp_path: Path
) -> None:
    """speculative.placement.in_engine: the app starts no Draft deployment, the engine core drafts in its
    own process (the target's own copy: every draft is kept, no channel time), and the answer is the
    target's alone."""
    from ray import serve

    from fuserve import LLM, SamplingParams
    from fuserve.cluster import build_app

    target = make_checkpoint(tmp_path / "target", "llama3", vocab_size=260, max_position_embeddings=256)
    model = {"path": str(target), "name": "tiny", "max_model_len": 256}
    plain = config_from_dict({"model": model, "cache": {"num_blocks": 64}})
    spec = {
        "method": "draft",
        "draft": {"path": str(target), "max_model_len": 256},
        "num_speculative_tokens": 3,
        "adaptive": False,
        "placement": {"in_engine": True},
    }
    config = config_from_dict({"model": model, "cache": {"num_blocks": 64}, "speculative": spec})
    prompt, n = "In the engine", 60
    want = LLM(plain).generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    app = "spec-in-engine"
    url = f"{serve_cluster.url}/{app}"
    serve.run(build_app(config, cluster_gpus=0), name=app, route_prefix=f"/{app}")
    assert _draft_actor_names(app) == []
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[0].outputs[0].text
    drafts = _spec_counter(url, "fuserve_spec_draft_tokens_total")
    assert drafts > 0 and _spec_counter(url, "fuserve_spec_accepted_tokens_total") == drafts
    assert _spec_counter(url, "fuserve_spec_channel_seconds_total") == 0
    serve.delete(app)


def test_engine_speculates_through_a_feature_draft_deployment(
    serve_cluster: ServeCluster, tmp_path: Path
) -> None:
    """An eagle1 draft file in the config: the engine core's target keeps its features from start-up,
    every round carries the new rows to the Draft deployment, which runs the feature-reading runner, and
    the answers are the target's alone (a random draft: its drafts are verified and mostly rejected), with
    the draft's second-best tokens verified beside its drafts (speculative.second_best)."""
    import sys

    import torch
    from ray import serve
    from test_feature_draft import eagle_config

    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    from eagle_model import EagleDraft
    from train_eagle import write_eagle

    from fuserve import LLM, SamplingParams
    from fuserve.cluster import build_app
    from fuserve.speculative.shipped_draft import DRAFT_FORMAT

    target = make_checkpoint(tmp_path / "target", "llama3", vocab_size=260, max_position_embeddings=256)
    torch.manual_seed(0)
    eagle = tmp_path / "eagle.safetensors"
    norm = torch.ones(eagle_config(target)["hidden_size"])
    write_eagle(
        eagle, EagleDraft(eagle_config(target), 64), norm, torch.arange(260), {"format": DRAFT_FORMAT}
    )
    model = {"path": str(target), "name": "tiny", "max_model_len": 256}
    config = config_from_dict(
        {
            "model": model,
            "cache": {"num_blocks": 64},
            "speculative": {
                "method": "draft",
                "draft": {"path": str(eagle), "max_model_len": 256},
                "num_speculative_tokens": 3,
                "adaptive": False,
                "second_best": True,
                "channel_timeout_s": TIMEOUT_S,
                "placement": {"device": "cpu", "num_cpus": 0.5},
            },
        }
    )
    prompt = "The feature draft"
    plain = config_from_dict({"model": model, "cache": {"num_blocks": 64}})
    want = LLM(plain).generate([prompt], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    app = "spec-eagle"
    url = f"{serve_cluster.url}/{app}"
    serve.run(build_app(config, cluster_gpus=0), name=app, route_prefix=f"/{app}")
    body = {"prompt": prompt, "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    deadline = time.monotonic() + 90
    while _spec_counter(url, "fuserve_spec_draft_tokens_total") == 0:  # the lookup runs in the background
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want[0].outputs[0].text
        assert time.monotonic() < deadline, "the engine never drafted through its feature draft deployment"
    assert _spec_counter(url, "fuserve_spec_alternative_tokens_total") > 0  # they crossed the channel
    serve.delete(app)
