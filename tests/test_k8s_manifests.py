"""The KubeRay manifests in k8s/ cannot drift: they equal what `fuserve k8s` generates now, their
serveConfigV2 is a valid Serve config (Ray's own `ServeDeploySchema`) running a valid fuserve config,
and the RayService and RayCluster (and the example Service, through the core Service schema the
RayService CRD embeds) validate against KubeRay's CRD schemas (vendored in k8s/schema/), with
unknown fields refused as `kubectl apply`'s strict field validation refuses them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fuserve.cli import main as cli_main
from fuserve.cluster.kuberay import CONFIG_DIR, MANIFEST_FILES
from fuserve.cluster.serve_config import serve_deploy_config, without_replicas
from fuserve.configs import HAPROXY_ENV, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SOURCE_CONFIG = "configs/llama3-8b.yaml"  # what k8s/ is generated from (see the files' first line)
IMAGE = "ghcr.io/your-org/fuserve:0.1.0"
(SCHEMA_FILE,) = sorted((K8S / "schema").glob("kuberay-v*.json"))


def _objects(file_name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / file_name).read_text()) if d]


def _by_kind(kind: str) -> dict[str, Any]:
    (obj,) = [o for f in MANIFEST_FILES for o in _objects(f) if o["kind"] == kind]
    return obj


def _strict(schema: Any) -> Any:
    """Objects with known properties refuse others, unless the CRD keeps unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _validator(kind: str) -> jsonschema.Validator:
    vendored = json.loads(SCHEMA_FILE.read_text())
    schema = _strict({"definitions": vendored["definitions"], **vendored["kinds"][kind]})
    return jsonschema.Draft7Validator(schema)


def test_committed_manifests_equal_generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the command is recorded with the relative config path
    assert cli_main(["k8s", SOURCE_CONFIG, "--image", IMAGE, "--out", str(tmp_path)]) == 0
    for name in MANIFEST_FILES:
        assert (tmp_path / name).read_text() == (K8S / name).read_text(), (
            f"k8s/{name} is stale: run `fuserve k8s {SOURCE_CONFIG} --image {IMAGE} --out k8s`"
        )


def test_serve_config_v2_is_a_valid_serve_config_running_the_mounted_fuserve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    service = _by_kind("RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "fuserve.cluster:app"
    # The args name the ConfigMap's file as the pods mount it; that file is a valid fuserve config,
    # the very one the manifests were generated from.
    path = Path(app["args"]["config"])
    assert path.parent == Path(CONFIG_DIR)
    config_map = _objects("rayservice.yaml")[0]
    assert config_map["kind"] == "ConfigMap"
    text = config_map["data"][path.name]
    config = config_from_dict(yaml.safe_load(text), path.name)
    assert config == load_config(ROOT / SOURCE_CONFIG)
    assert serve_config == serve_deploy_config(config, str(path), host="0.0.0.0")


@pytest.mark.parametrize("config_file", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_gives_a_valid_serve_config_whose_args_are_a_fuserve_config(config_file: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = load_config(ROOT / "configs" / config_file)
    serve_config = serve_deploy_config(config, without_replicas(config))
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    inline = config_from_dict(app["args"]["config"])
    assert inline.model_copy(update={"serve": config.serve}) == config  # only replicas left out
    (engine,) = app["deployments"]
    if config.serve.autoscaling is None:
        assert engine == {"name": "Engine", "num_replicas": config.serve.num_replicas}
    else:
        assert engine["autoscaling_config"]["max_replicas"] == config.serve.autoscaling.max_replicas


def test_a_replica_change_changes_only_the_deployment_override() -> None:
    """So re-applying it is Serve's light update (add/drain replicas), not a redeploy of all."""
    one = config_from_dict({"serve": {"num_replicas": 1}})
    two = config_from_dict({"serve": {"num_replicas": 2}})
    auto = config_from_dict({"serve": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    configs = [serve_deploy_config(c, without_replicas(c)) for c in (one, two, auto)]
    apps = [c["applications"][0] for c in configs]
    assert apps[0]["args"] == apps[1]["args"] == apps[2]["args"]
    assert [a["deployments"][0].get("num_replicas") for a in apps] == [1, 2, "auto"]


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_kuberay_objects_validate_against_the_vendored_crd_schema(kind: str) -> None:
    obj = _by_kind(kind)
    _validator(kind).validate(obj)
    # The check can fail: a misspelled field and a wrong type are refused.
    misspelled = copy.deepcopy(obj)
    spec = misspelled["spec"].get("rayClusterConfig", misspelled["spec"])
    spec["workerGroupSpecs"][0]["template"]["spec"]["toleration"] = []
    wrong_type = copy.deepcopy(obj)
    spec = wrong_type["spec"].get("rayClusterConfig", wrong_type["spec"])
    spec["workerGroupSpecs"][0]["replicas"] = "one"
    for bad in (misspelled, wrong_type):
        with pytest.raises(jsonschema.ValidationError):
            _validator(kind).validate(bad)


def test_the_cluster_runs_the_serving_path_on_gpu_nodes() -> None:
    config = load_config(ROOT / SOURCE_CONFIG)
    for kind in ("RayService", "RayCluster"):
        spec = _by_kind(kind)["spec"]
        cluster = spec.get("rayClusterConfig", spec)
        assert cluster["authOptions"] == {"mode": "token"}
        head = cluster["headGroupSpec"]["template"]["spec"]
        (group,) = cluster["workerGroupSpecs"]
        worker = group["template"]["spec"]
        for pod in (head, worker):
            (container,) = pod["containers"]
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env == HAPROXY_ENV  # the config's serve.ingress is haproxy: every node needs it
        (container,) = worker["containers"]
        tp = config.parallel.tensor_parallel_size
        assert container["resources"]["limits"]["nvidia.com/gpu"] == tp
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker[
            "tolerations"
        ]
        assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert {
            container["livenessProbe"]["httpGet"]["port"],
            container["readinessProbe"]["httpGet"]["port"],
        } == {"serve"}
        assert "nodeSelector" not in head and "tolerations" not in head
        a = config.serve.autoscaling
        assert (group["minReplicas"], group["maxReplicas"]) == (a.min_replicas, a.max_replicas)


def test_the_example_service_is_a_valid_core_service_and_the_ingress_targets_the_serve_service() -> None:
    """KubeRay's RayService CRD embeds the core v1 Service schema (`serveService`): the vendored file
    checks the Service too. The Ingress must point at the Service KubeRay makes for a RayService."""
    vendored = json.loads(SCHEMA_FILE.read_text())
    service_schema = vendored["kinds"]["RayService"]["properties"]["spec"]["properties"]["serveService"]
    service = _by_kind("Service")
    jsonschema.Draft7Validator(_strict(service_schema)).validate(service)
    assert service["spec"]["selector"]["ray.io/cluster"] == _by_kind("RayCluster")["metadata"]["name"]
    ingress = _by_kind("Ingress")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    config = load_config(ROOT / SOURCE_CONFIG)
    assert backend == {
        "name": f"{_by_kind('RayService')['metadata']['name']}-serve-svc",
        "port": {"number": config.serve.port},
    }


def test_api_keys_never_travel_in_a_deploy_config() -> None:
    from fuserve.cluster.serve_config import without_replicas
    from fuserve.configs import config_from_dict

    config = config_from_dict({"serve": {"api_keys": ["sk-local-secret"]}})
    with pytest.raises(ValueError, match="FUSERVE_API_KEYS") as err:
        without_replicas(config)
    assert "sk-local-secret" not in str(err.value)
