"""aiservices server: a grpc.aio ToolService in front of AI-powered tools."""
