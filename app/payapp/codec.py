"""The JSON library of the request path, chosen by PAYAPP_JSON (a measured tuning knob: see bench/)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class Codec:
    name: str
    loads: Callable[[bytes], Any]
    dumps: Callable[[Any], bytes]


def _stdlib_dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


CODECS = {
    "orjson": Codec("orjson", orjson.loads, orjson.dumps),
    "stdlib": Codec("stdlib", json.loads, _stdlib_dumps),
}
