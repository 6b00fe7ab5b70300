"""The gRPC face: aiservices.v1.ToolService over grpc.aio, on the core.

The path of one call: `handlers` registers each method as the outermost interceptor (request id,
draining, metrics, access log, the one mapping of domain errors to status) around
authentication around the servicer (protobuf to core calls and back).
"""
