"""Ray cluster side of fuserve: the Serve application, its deployment options, bootstrap, KubeRay."""

from fuserve.cluster.app import app, build_app

__all__ = ["app", "build_app"]
