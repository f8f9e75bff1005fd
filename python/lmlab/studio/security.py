"""The studio's guard at the door: host binding, the access token, the Host header, body sizes.

Rules (README "Studio" repeats them for teachers):
- The server binds 127.0.0.1 unless --host says otherwise. Any other host makes a random access
  token (secrets.token_urlsafe) that is printed in the URL at start; every request must carry it,
  as ?token=... (the first page visit; the answer then sets an HttpOnly, SameSite=Strict cookie)
  or that cookie. Anything else is 403.
- On the loopback address without a token, requests must come with a loopback Host header (a web
  page elsewhere cannot reach the studio by pointing its own domain name at 127.0.0.1).
- A POST must say Content-Type: application/json (a cross-site form cannot send that without the
  browser asking first, which the studio never allows) and carry at most MAX_BODY bytes (413).
The guard is plain ASGI middleware, so it sees every request before any route does.
"""

from __future__ import annotations

import json
import secrets
from http.cookies import SimpleCookie
from typing import Optional
from urllib.parse import parse_qs

MAX_BODY = 64 * 1024          # bytes of a request body: a prompt, a chat, a ranking
COOKIE = "lmlab_studio_token"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _host_name(value: str) -> str:
    """The host part of a Host header ("127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "[::1]")."""
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


async def _refuse(send, status: int, message: str, headers=()) -> None:
    body = json.dumps({"error": message}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: token, Host header, content type and body size, in that order."""

    def __init__(self, app, *, token: Optional[str], allowed_hosts=None, max_body: int = MAX_BODY):
        self.app = app
        self.token = token
        self.allowed_hosts = None if allowed_hosts is None else set(allowed_hosts)
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None and _host_name(headers.get("host", "")) not in self.allowed_hosts:
            return await _refuse(send, 403, "this studio answers only requests addressed to "
                                 + " or ".join(sorted(self.allowed_hosts)))
        set_cookie = ()
        if self.token is not None:
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
            cookie = SimpleCookie()
            try:
                cookie.load(headers.get("cookie", ""))
            except Exception:  # a malformed Cookie header counts as no cookie
                cookie = SimpleCookie()
            from_cookie = cookie[COOKIE].value if COOKIE in cookie else None
            if given is not None and secrets.compare_digest(given.encode(), self.token.encode()):
                set_cookie = ((b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; "
                               "Path=/".encode()),)
            elif from_cookie is None or not secrets.compare_digest(from_cookie.encode(), self.token.encode()):
                return await _refuse(send, 403, "this studio needs its access token: open the URL "
                                     "it printed at start (with ?token=...)")
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await _refuse(send, 415, "a POST must send JSON (Content-Type: application/json)")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await _refuse(send, 413, f"request body too large: at most {self.max_body} bytes")
        # A body sent without Content-Length (chunked) is counted as it arrives; past max_body the
        # guard answers 413 itself, tells the app the client left, and drops whatever it answers.
        refused = False
        seen = 0

        async def counted_receive():
            nonlocal refused, seen
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    refused = True
                    await _refuse(send, 413, f"request body too large: at most {self.max_body} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted_receive, self._with_headers(guarded_send, set_cookie))
        except Exception:
            if not refused:  # after a 413 the app's complaint about the "disconnect" is expected
                raise

    @staticmethod
    def _with_headers(send, extra):
        if not extra:
            return send

        async def sending(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + list(extra)
            await send(message)

        return sending
