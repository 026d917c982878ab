"""The fineserve gRPC server: KServe v2 and fineserve.v1 over onnxruntime, with dynamic batching."""
