"""Request targets: which raw paths Tollgate accepts, and which `/v1/*` paths may go upstream.

The upstream path is built from the raw path the client sent, never from a decoded one, so a
percent-encoded `/`, `?` or dot segment can never address an upstream path outside the route.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

# Encoded `/`, `\`, `?`, `#` and NUL would change what the upstream reads as the path.
_REFUSED_ESCAPES = (b"%2f", b"%5c", b"%3f", b"%23", b"%00")


def refused_path(raw_path: bytes) -> str | None:
    """Why this raw request path is refused (a 400 message), or None when it is safe."""
    if not raw_path.startswith(b"/"):
        return "The request path must start with /"
    if b"\\" in raw_path or b"\x00" in raw_path:
        return "The request path must not contain a backslash or NUL"
    if b"%" in raw_path:
        lowered = raw_path.lower()
        if any(escape in lowered for escape in _REFUSED_ESCAPES):
            return "The request path must not contain an encoded /, \\, ?, # or NUL"
    segments = raw_path.split(b"/")[1:]
    for index, segment in enumerate(segments):
        decoded = unquote_to_bytes(segment) if b"%" in segment else segment
        if decoded in (b".", b".."):
            return "The request path must not contain . or .. segments"
        if not decoded and index < len(segments) - 1:
            return "The request path must not contain empty segments (//)"
    return None


def upstream_path(raw_path: bytes, prefix_segments: int) -> str:
    """The raw path below its route prefix (`/v1` is 1 segment, `/api/v1` 2), as sent.

    `refused_path` has passed it, so raw and decoded paths have the same segments.
    """
    rest = raw_path.split(b"/", prefix_segments + 1)[-1]
    return "/" + rest.decode("latin-1")


class PassthroughPaths:
    """`TOLLGATE_PASSTHROUGH_PATHS`: exact `/v1/...` paths, or `/v1/.../*` prefixes."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.exact = frozenset(p for p in patterns if not p.endswith("/*"))
        self.prefixes = tuple(p[:-1] for p in patterns if p.endswith("/*"))

    def allows(self, path: str) -> bool:
        """`path` is the decoded path in its `/v1/...` form."""
        if path in self.exact:
            return True
        return any(path.startswith(prefix) and len(path) > len(prefix) for prefix in self.prefixes)
