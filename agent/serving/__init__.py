"""The data plane: models on disk, onnxruntime sessions, scheduling and the gRPC front end.

``dataplane`` is protocol-neutral; ``grpc_server`` only translates wire messages
to it, and ``grpc_status`` is the one table from errors to status codes.
``onnx_runtime`` is the one module that imports onnxruntime.
"""
