"""Async server interceptors, outermost first: request context and access log, drain,
authentication, decode guard, rate limiting. Health and reflection pass through untouched."""
