"""payapp command line (placeholder until the service lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("payapp: no commands yet", file=sys.stderr)
    return 2
