"""The KServe v2 / Open Inference Protocol over gRPC.

``service`` is the transport (the only module here that imports grpc); the modules beside it
convert its messages to numpy arrays and our own types and back, and check requests on the way.
"""
