"""Faces: each turns one protocol into calls of the core (`aiservices_server.core`) and back."""
