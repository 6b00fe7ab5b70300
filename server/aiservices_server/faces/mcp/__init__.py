"""The MCP face: the same tools over the Model Context Protocol's Streamable HTTP transport, on
the same core as gRPC, with the official SDK (`mcp`) doing the protocol."""
