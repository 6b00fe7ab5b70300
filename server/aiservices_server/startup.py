"""The one error start-up raises: the app (settings checks, listeners) and TLS (certificate
files) both stop the server with it."""


class StartupError(RuntimeError):
    """The server cannot start; the message is the one line an operator needs."""
