"""The inference API (`cifar10-pipeline api`): the exported ONNX model over HTTP.

settings: what the server is told (limits, batching, drift; light, read by the CLI);
guards: what one request may cost; batching: concurrent requests in one model call;
monitor: Prometheus metrics and input drift; app: the routes; server: uvicorn, its workers and
which export it serves.
"""
