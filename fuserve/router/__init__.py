"""The serving front: OpenAI HTTP API and gRPC on Ray Serve, and the length-aware request router.

Files, in the order a request meets them:

    ingress.py              the ingress deployment: HTTP routes and gRPC methods
    protocol.py, errors.py  OpenAI request/response bodies; errors in OpenAI's shape
    prompts.py              request -> engine requests (tokenize, length checks, work, prefix keys)
    engine_client.py        open/merge/time/cancel the streams from the engine replicas
    responses.py            engine deltas -> responses, SSE chunks, usage, logprobs
    grpc_service.py, proto/ the gRPC API (fuserve.proto and its generated modules)
    metrics.py              Prometheus at /metrics
    engine_messages.py      what passes between the ingress and the engine replicas
    routing_policy.py       prefix keys, and the token-count ranking (requests without a body)
    ttft_model.py           predicted time to first token per replica, and the ranking on it
    replica_view.py         a replica's report -> the view the TTFT model reads; the peer count
    prefix_affinity.py      Ray Serve LLM's prefix-affinity policy, as a baseline
    length_aware_router.py  those decisions as a Ray Serve RequestRouter
"""
