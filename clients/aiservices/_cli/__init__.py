"""The pieces of the `aiservices` command line (entry point: aiservices.cli:main)."""
