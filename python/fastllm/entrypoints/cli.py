"""`fastllm-serve`: the command line entry point of the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastllm-serve",
        description="Serve a model over an OpenAI-compatible HTTP API.",
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="local model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from fastllm.entrypoints.openai import api_server
    except ImportError:
        parser.print_help()
        print("\nfastllm-serve: the HTTP server is not part of this build yet; the native engine "
              "is available as fastllm._C.Engine.", file=sys.stderr)
        return 2
    return api_server.run(args)


if __name__ == "__main__":
    sys.exit(main())
