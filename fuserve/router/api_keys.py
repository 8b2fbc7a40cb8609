"""Optional bearer-token authentication for HTTP and gRPC.

    keys = ApiKeys.from_config(config.serve)   # serve.api_keys + the keys in $serve.api_keys_env
    keys.check(request.headers.get("authorization"))          # HTTP: raises a 401 APIError
    keys.check(grpc_service.authorization(grpc_context))      # gRPC: the same, as UNAUTHENTICATED

With no key configured everything is allowed (a laptop on the loopback). Each presented token is
compared with every key by `hmac.compare_digest`, in time that does not depend on where they first
differ, so the comparison leaks nothing of a key. Keys never appear in a message or a log line: the
config holds them as pydantic `SecretStr` (printed as `**********`), and a refusal says only that the
token was missing or wrong.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from pydantic import SecretStr

from fuserve.configs import FuserveConfig, ServeConfig
from fuserve.router.errors import unauthorized


def keys_from_env(serve_cfg: ServeConfig) -> list[str]:
    """The comma-separated keys in the environment variable the config names (none if unset)."""
    raw = os.environ.get(serve_cfg.api_keys_env, "")
    return [k.strip() for k in raw.split(",") if k.strip()]


def with_env_api_keys(config: FuserveConfig) -> FuserveConfig:
    """A copy of `config` holding the environment's keys too, for replicas whose environment lacks them."""
    env_keys = keys_from_env(config.serve)
    if not env_keys:
        return config
    config = config.model_copy(deep=True)
    config.serve.api_keys = [*config.serve.api_keys, *(SecretStr(k) for k in env_keys)]
    return config


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[bytes, ...]

    @classmethod
    def from_config(cls, serve_cfg: ServeConfig) -> ApiKeys:
        configured = [k.get_secret_value() for k in serve_cfg.api_keys]
        if any(k and not k.strip("*") for k in configured):  # what a dump of the config writes for a key
            raise ValueError(
                "serve.api_keys holds a masked key ('**********'): this config was written out with its "
                "secrets hidden and read back; set the real keys (or FUSERVE_API_KEYS)"
            )
        return cls(tuple(k.encode() for k in dict.fromkeys(configured + keys_from_env(serve_cfg)) if k))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None) -> None:
        """`authorization` is the header's value (`Bearer KEY`); raises a 401 APIError unless it holds
        one of the keys."""
        if not self.keys:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("send your API key as the header `Authorization: Bearer <key>`")
        presented = token.strip().encode("utf-8", "replace")
        matched = False
        for key in self.keys:  # every key compared, so the time does not tell which one matched
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise unauthorized("the API key is not valid; check the key you were given")
