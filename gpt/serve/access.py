"""Who may ask, checked before any route runs: the Host, the browser Origin (CORS), the key, a JSON body.

The client to distrust is a browser: any web page can make it send requests to 127.0.0.1, and DNS
rebinding can even make them same-origin to the page (its own name, resolved to this machine). So
the server answers only to Host names it knows (its bound address, localhost, 127.0.0.1, [::1] and
--allowed-hosts), refuses requests from another page's Origin unless --cors-origins lists it, and
runs a POST only when its body is declared application/json (a form or text/plain post, which a
page may send anywhere without asking, never executes). Then the bearer key and the body's size.
Every response carries headers that keep the playground page out of frames, its scripts to its own
files and its address out of Referer headers. Threat model: docs/security.md.
"""

from __future__ import annotations

import json
import secrets
from typing import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt.serve.protocol import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
ANY_ADDRESS = ("0.0.0.0", "::", "[::]", "")  # a bind address that is no name a client can use
CSP = "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer"}
CORS_HEADERS = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600"}
KEYED_PATHS = ("/v1", "/tokenize", "/detokenize")  # the page and /health answer without the key


class JSONError(Response):
    """OpenAI's error JSON, ASCII-escaped: a message quoting what the client sent (a lone surrogate, a
    stray byte of a header) is always valid JSON and never fails to encode."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(e: APIError) -> Response:
    return JSONError(e.body(), status_code=e.status, headers=e.headers)


def host_name(value: str) -> str:
    """The name of a Host header or a --host/--allowed-hosts value, lowercase, without port or final dot:
    'Example.COM.:8000' -> 'example.com', '[::1]:8000' and '::1' -> '[::1]'."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[: v.find("]") + 1] or v
    if v.count(":") > 1:  # a bare IPv6 address
        return f"[{v}]"
    return v.split(":", 1)[0].rstrip(".")


def netloc(origin: str) -> str:
    """'http://Localhost:8000' -> 'localhost:8000': what the Host header of a same-origin request holds."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:  # not a URL (an Origin a browser would not send)
        return ""


def quoted(text: str, limit: int = 100) -> str:
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


class Gate:
    """ASGI middleware: a request passes Host, Origin, key, content type and size, or gets OpenAI's error JSON
    (403, 401, 415, 413); an allowed cross-origin preflight is answered here (204)."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
                 cors_origins: Iterable[str] = (), api_key: str | None = None, max_body_bytes: int = 1 << 20):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        allowed_hosts, cors_origins = list(allowed_hosts), list(cors_origins)
        self.any_host = "*" in allowed_hosts
        self.hosts = set(LOOPBACK_NAMES) | {host_name(h) for h in [host, *allowed_hosts] if h not in ANY_ADDRESS}
        self.any_origin = "*" in cors_origins
        self.origins = {o.strip().rstrip("/").lower() for o in cors_origins}
        self.vary = bool(cors_origins)  # answers differ by Origin: caches must know

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        extra = dict(SECURITY_HEADERS, **({"Vary": "Origin"} if self.vary else {}))
        try:
            origin = self.check_host_and_origin(headers)
            if origin is not None:
                extra.update(CORS_HEADERS, **{"Access-Control-Allow-Origin": origin})
            if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
                await Response(status_code=204, headers=extra)(scope, receive, send)
                return
            self.check_key_and_body(scope, headers)
        except APIError as e:
            e.headers = {**extra, **e.headers}
            await error_response(e)(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                out = MutableHeaders(scope=message)
                for name, value in extra.items():
                    out[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def check_host_and_origin(self, headers: Headers) -> str | None:
        """403 unless the Host is one this server answers to and the Origin, if any, is its own or allowed;
        returns the Origin to name in CORS headers (None: same-origin or not a browser)."""
        host = headers.get("host", "")
        if not self.any_host and host_name(host) not in self.hosts:
            raise APIError(403, f"The Host {quoted(host)} is not one this server answers to (a DNS rebinding attack "
                                "looks like this); list the name with --allowed-hosts to allow it.",
                           type="permission_error", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is None or (host and netloc(origin) == host.lower()):
            return None  # a browser's same-origin request (the playground), or no browser
        if self.any_origin or origin.strip().rstrip("/").lower() in self.origins:
            return origin
        raise APIError(403, f"Cross-origin requests from {quoted(origin)} are refused; list the origin with "
                            "--cors-origins to allow that page to use this server.",
                       type="permission_error", code="origin_not_allowed")

    def check_key_and_body(self, scope: Scope, headers: Headers) -> None:
        """401 without the bearer key (when one is set), 415 for a POST not declared JSON, 413 for a body too large."""
        if self.api_key and scope["path"].startswith(KEYED_PATHS):
            given = headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "")
            if kind.split(";", 1)[0].strip().lower() != "application/json":
                raise APIError(415, f"The request's Content-Type must be application/json, got {quoted(kind)}.",
                               code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > self.max_body_bytes):
            raise too_large(self.max_body_bytes)


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the server's limit of {limit} bytes.",
                    code="request_too_large")
