"""Vendor the KubeRay CRDs' OpenAPI v3 schemas that tests/test_k8s_manifests.py validates against.

    python k8s/schema/vendor_kuberay_crds.py KUBERAY_CHECKOUT v1.7.0

reads `ray-operator/config/crd/bases/ray.io_{rayclusters,rayservices}.yaml` of a kuberay checkout at
that tag and writes `k8s/schema/kuberay-<version>.json`: the `v1` schemas of RayCluster and RayService
without their `status` and `description`s, with the RayCluster spec once (a RayService's
`rayClusterConfig` is the same schema; this script checks so). About 150 KB instead of 2 MB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

CRD_DIR = "ray-operator/config/crd/bases"
KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def v1_schema(crd_file: Path) -> dict[str, Any]:
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strip(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    return schema


def vendor(checkout: Path, version: str) -> dict[str, Any]:
    schemas = {kind: v1_schema(checkout / CRD_DIR / f) for kind, f in KINDS.items()}
    cluster_spec = schemas["RayCluster"]["properties"]["spec"]
    service_spec = schemas["RayService"]["properties"]["spec"]
    if service_spec["properties"]["rayClusterConfig"] != cluster_spec:
        raise SystemExit("RayService.spec.rayClusterConfig differs from RayCluster.spec: vendor both")
    service_spec["properties"]["rayClusterConfig"] = {"$ref": "#/definitions/RayClusterSpec"}
    schemas["RayCluster"]["properties"]["spec"] = {"$ref": "#/definitions/RayClusterSpec"}
    return {
        "kuberay_version": version,
        "source": f"github.com/ray-project/kuberay@{version}:{CRD_DIR}, apiVersion ray.io/v1 "
        "(descriptions and status removed)",
        "definitions": {"RayClusterSpec": cluster_spec},
        "kinds": schemas,
    }


def main(argv: list[str]) -> int:
    checkout, version = Path(argv[0]), argv[1]
    out = Path(__file__).resolve().parent / f"kuberay-{version}.json"
    out.write_text(json.dumps(vendor(checkout, version), sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
