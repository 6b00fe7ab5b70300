"""The core every face calls: authentication, rate limits, the bound on calls in flight and the
tool service. It knows no transport: faces turn their protocol into these calls and turn results
and domain errors (`aiservices_server.errors`) back into their protocol."""
