"""`fastllm-serve`: the command line entry point of the OpenAI-compatible server."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from fastllm.entrypoints.openai.api_server import main as serve

    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
