#!/usr/bin/env python3
"""Write docker/.env from .env.example with every required secret generated (standard library only).

    python3 make-env.py            # next to docker-compose.yml; refuses to overwrite an existing .env
    python3 make-env.py --out PATH

Every variable that .env.example leaves empty and marks `# required` gets a fresh random value: 64 hex digits
(they go into database and broker URLs, a command line and a JSON connection unquoted, so no character may need
escaping or start an option) and a Fernet key for AIRFLOW_FERNET_KEY. AIRFLOW_UID becomes your user id on Linux.
Nothing is printed but the path.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fernet_key() -> str:
    """What cryptography's Fernet.generate_key() returns: 32 random bytes, URL-safe base64."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def generate(name: str) -> str:
    return fernet_key() if name == "AIRFLOW_FERNET_KEY" else secrets.token_hex(32)


def render(example: str) -> str:
    """.env.example with a generated value for each empty variable whose comment line above reads `# required`."""
    out: list[str] = []
    required = False
    for line in example.splitlines():
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if match and required and not match.group(2):
            line = f"{match.group(1)}={generate(match.group(1))}"
        elif match and match.group(1) == "AIRFLOW_UID" and hasattr(os, "getuid"):
            line = f"AIRFLOW_UID={os.getuid() or 50000}"
        required = line.lstrip().startswith("# required")
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / ".env")
    parser.add_argument("--example", type=Path, default=HERE / ".env.example")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists; not overwriting it (delete it first to start over)", file=sys.stderr)
        return 1
    text = render(args.example.read_text())
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
