"""Async server interceptors, outermost first: request context and access log, then
authentication, then rate limiting. Health and reflection pass through untouched."""
