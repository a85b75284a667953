"""``ipa_rt serve``'s API key: where it comes from, how it is held, and the gate every HTTP request passes.

:class:`ApiKey` keeps only a salted HMAC of the key; :class:`RequireKey` is the ASGI middleware the gateway installs
(no Ray here: tests call it directly; docs/guides/serving.md, "Who may call it": where the key comes from, what is
refused, what it does not cover).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

ENV = "IPA_RT_API_KEY"
OPEN_PATHS = frozenset({"/healthz"})  # a load balancer's probe carries no key
MAKE_ONE = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class ApiKey:
    """A key the server requires. Holds a random salt and the HMAC-SHA256 of the key under it, never the key."""

    __slots__ = ("_mac", "_salt")

    def __init__(self, key: str, where: str = "api_key") -> None:
        # the messages name where the key came from and never quote it: a bad key may still be someone's secret
        if not isinstance(key, str):
            raise ConfigError(f"{where} is a {type(key).__name__}; expected a string (make one: {MAKE_ONE})")
        if not key:
            raise ConfigError(
                f"{where} is empty; expected a key (make one: {MAKE_ONE}); leave it unset to serve without"
            )
        if not all("!" <= c <= "~" for c in key):  # it travels in an HTTP header: printable ASCII, no spaces
            raise ConfigError(
                f"{where} has spaces or characters outside printable ASCII; expected a token such as {MAKE_ONE} prints"
            )
        self._salt = secrets.token_bytes(16)
        self._mac = self._digest(key)

    def _digest(self, key: str) -> bytes:
        # utf-8 is lossless: no two strings share their bytes, so no other string can stand in for the key
        return hmac.new(self._salt, key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def matches(self, presented: str) -> bool:
        """Constant time: both sides are 32-byte digests, and ``hmac.compare_digest`` reads all of them."""
        return hmac.compare_digest(self._digest(presented), self._mac)

    def __repr__(self) -> str:
        return "ApiKey(<hidden>)"

    __str__ = __repr__


def refusal(key: ApiKey, authorization: str | None) -> tuple[str, str] | None:
    """Why a request with this ``Authorization`` header is refused (the message, the ``WWW-Authenticate`` value), or
    None when it may pass. The messages never quote the header: it may hold a key, or this one mistyped."""
    usage = "send the header 'Authorization: Bearer <key>'"
    if authorization is None or not authorization.strip():
        return f"this server requires an API key and the request has no Authorization header; {usage}", "Bearer"
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":  # RFC 7235: the scheme is case-insensitive
        return f"the Authorization header is not of the Bearer scheme; {usage}", "Bearer"
    if not token.strip():
        return f"the Authorization header has no key after 'Bearer'; {usage}", "Bearer"
    if not key.matches(token.strip()):
        return "the API key in the Authorization header is not this server's key", 'Bearer error="invalid_token"'
    return None


class RequireKey:
    """ASGI middleware: the one check every HTTP and WebSocket request to the app passes (its routes, its 404s and
    FastAPI's ``/docs`` and ``/openapi.json`` alike). ``key`` is called per request: the gateway reads its own
    replica's key, which exists only once the replica is constructed."""

    def __init__(self, app: Callable, key: Callable[[], ApiKey | None]) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan events carry no request
            await self.app(scope, receive, send)
            return
        path, root = scope["path"], scope.get("root_path", "").rstrip("/")
        if root and path.startswith(root + "/"):  # mounted under a prefix: the path within the app
            path = path[len(root) :]
        key = None if path in OPEN_PATHS else self.key()
        if key is None:
            await self.app(scope, receive, send)
            return
        # ASGI header names are lower case; of a repeated header the first is the one checked
        header = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), None)
        why = refusal(key, None if header is None else header.decode("latin-1"))
        if why is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "API key required"})  # 1008: policy
        else:
            from starlette.responses import JSONResponse

            message, challenge = why
            body = {"error": message, "field": "authorization"}
            await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": challenge})(scope, receive, send)
