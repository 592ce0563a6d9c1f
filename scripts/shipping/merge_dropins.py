#!/usr/bin/env python3
"""Writes MAIN merged with DROPIN... as one TOML file, with the drop-in rules the daemon documents:
tables merge key by key, a later file's value wins, and `[[llm.providers]]` entries are appended.

Used by scripts/check-shipping.sh to validate config/conf.d/ examples with `chatcli config check`
while the binary does not read conf.d/ itself; once it does, the check runs the daemon on the real
directory instead.

    merge_dropins.py MAIN.toml DROPIN.toml... > merged.toml
"""

from __future__ import annotations

import json
import re
import sys
import tomllib

APPENDED = {("llm", "providers")}


def merge(base: dict, over: dict, path: tuple = ()) -> dict:
    for key, value in over.items():
        here = path + (key,)
        if here in APPENDED and isinstance(base.get(key), list):
            base[key] = base[key] + value
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value, here)
        else:
            base[key] = value
    return base


def emit(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(emit(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key(k)} = {emit(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 64
    merged: dict = {}
    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            merge(merged, tomllib.load(f))
    for k, v in merged.items():
        print(f"{key(k)} = {emit(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
