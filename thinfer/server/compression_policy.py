"""`CompressionPolicy`: what a client may ask of KV-cache compression on this server.

A DynTS predictor is a file on the server, so a client never names a path: the operator
registers heads by name at start (`--dynts-predictor NAME=PATH`, each loaded then, so a bad
file stops the start, not a request) and a request's `kv_compression.predictor` must be one
of those names. An unknown name is a 400 listing the names, never a word about files. With
`enforce`, the server's own compression (`--kv-compression`) applies to every request and a
request carrying `kv_compression` is refused, so no client can opt out with
`{"method": "full"}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from thinfer.server.errors import bad_request


@dataclasses.dataclass(frozen=True)
class CompressionPolicy:
    """Named DynTS heads (name -> path) and whether the server's compression is enforced."""

    predictors: dict[str, str] = dataclasses.field(default_factory=dict)
    enforce: bool = False

    def resolve(self, requested: dict[str, Any] | None) -> dict[str, Any] | None:
        """The request's `kv_compression` with its predictor name turned into the registered
        path; raises a 400 `APIError` for what this server does not allow."""
        if requested is None:
            return None
        if self.enforce:
            raise bad_request(
                "kv_compression: this server enforces its own KV-cache compression; "
                "leave the field out",
                "kv_compression",
            )
        if not isinstance(requested, dict) or "predictor" not in requested:
            return requested
        name = requested["predictor"]
        offered = ", ".join(sorted(self.predictors)) or "none"
        if not isinstance(name, str) or name not in self.predictors:
            raise bad_request(
                f"kv_compression.predictor: not a predictor this server offers; it offers: "
                f"{offered} (names registered with --dynts-predictor, never paths)",
                "kv_compression",
            )
        return requested | {"predictor": self.predictors[name]}


def parse_predictor_flags(values: list[str] | None) -> dict[str, str]:
    """`--dynts-predictor NAME=PATH` values as {name: path}; ValueError on a bad one."""
    heads: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--dynts-predictor: expected NAME=PATH, got {value!r}")
        if name in heads:
            raise ValueError(f"--dynts-predictor: name {name!r} given twice")
        heads[name] = path
    return heads
