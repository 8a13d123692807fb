"""The ``llmray`` command: run the operator, generate CRDs, manage the local sandbox."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _crds(args: argparse.Namespace) -> int:
    from llmray.api.crd import render_crds

    out = Path(args.out)
    stale = []
    for name, text in render_crds().items():
        path = out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale CRDs (run `llmray crds`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; subcommands register themselves here."""
    parser = argparse.ArgumentParser(prog="llmray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    crds = sub.add_parser("crds", help="generate crds/*.yaml from the API models")
    crds.add_argument("--out", default="crds", help="output folder (default: crds)")
    crds.add_argument("--check", action="store_true", help="fail if the committed CRDs are stale")
    crds.set_defaults(func=_crds)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
