"""The `maverick` command line: `commands.py` holds the parser, the small subcommands and `main`; the
larger subcommands have a module each (`serve.py`, `top.py`, `plan.py`, `generate.py`), and
`grpc_client.py` is the gRPC client `bench serve` hands to `cluster/bench`. Subcommands import their
heavy dependencies lazily."""

from router.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
