"""The ``nvpool`` command: one module per group of subcommands (``volume``/``pool``, ``cluster``,
``meta``/``agent``, ``export``/``mount``, ``bench``, ``certs``, ``dataset``, ``health``/``completion``),
the shared argument types and output in ``common``, the parser and entry point in ``main``."""

from nvpool.client.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
