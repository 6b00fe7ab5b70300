"""Faces: each turns one protocol into calls of the core (`server.core`) and back."""
