"""Who may open the browser app: loopback by default, an access token everywhere else.

``medtuning web`` reads files on the server and starts training jobs, so a server reachable from
other machines must not serve anyone who finds the port. The token travels as ``?token=...`` in
the first URL (printed at start, as Jupyter does); the gate then sets a cookie, so the page's
websocket and later requests carry it without the token showing in every address.

Standard library only at import time: ``medtuning web --help`` and the host / token rules work
without trame; :func:`token_middleware` imports aiohttp (trame's web server) when it is built.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from typing import Any, Optional

from MedTuningLib.errors import MedTuningError

COOKIE_NAME = "medtuning_token"
QUERY_NAME = "token"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to an outside address


@dataclass(frozen=True)
class AccessPolicy:
    host: str
    token: Optional[str]  # None: no token asked for (loopback without --token)
    generated: bool = False  # the token was made here (print it)


def access_policy(host: str, token: Optional[str]) -> AccessPolicy:
    """The token rule: loopback needs none unless given; any other address needs one (made when absent).

    An empty ``--token ""`` on an outside address is refused rather than silently serving everyone.
    """
    if token is not None and not token.strip():
        if is_loopback(host):
            return AccessPolicy(host, None)
        raise MedTuningError("WEB_TOKEN_REQUIRED", f"an empty --token would let anyone reaching {host} read the "
                             "server's files and start training jobs",
                             "leave out --token to have one made and printed, or give a long random one")
    if token is not None:
        return AccessPolicy(host, token.strip())
    if is_loopback(host):
        return AccessPolicy(host, None)
    return AccessPolicy(host, secrets.token_urlsafe(24), generated=True)


def check_port_free(host: str, port: int) -> None:
    """WEB_PORT_IN_USE when another program listens on ``host:port`` (port 0 picks a free one)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    bind_host = "" if host in ("0.0.0.0", "::") else host.strip("[]")
    if host.lower() == "localhost":
        bind_host, family = "127.0.0.1", socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((bind_host, port))
        except OSError as exc:
            raise MedTuningError("WEB_PORT_IN_USE", f"port {port} on {host} is already in use ({exc.strerror})",
                                 f"stop the program using it, or choose another port: medtuning web --port {port + 1}",
                                 port=port) from exc


def token_matches(expected: str, offered: Optional[str]) -> bool:
    return offered is not None and hmac.compare_digest(expected.encode("utf-8"), offered.encode("utf-8"))


def refusal_page(code: str, message: str, hint: str) -> str:
    """The page a browser gets without the right token: the code and what to do, as the CLI says it."""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>MedTuning: access refused</title></head>"
            "<body style='font-family: sans-serif; margin: 3em'>"
            f"<h1>Access refused</h1><p id='error-code'><code>{html.escape(code)}</code></p>"
            f"<p id='error-message'>{html.escape(message)}</p><p id='error-hint'>{html.escape(hint)}</p></body></html>")


def token_middleware(token: str) -> Any:
    """An aiohttp middleware that lets through only requests that carry ``token`` (query or cookie)."""
    from aiohttp import web

    @web.middleware
    async def gate(request: "web.Request", handler: Any) -> Any:
        offered_query = request.query.get(QUERY_NAME)
        offered = offered_query if offered_query is not None else request.cookies.get(COOKIE_NAME)
        if token_matches(token, offered):
            response = await handler(request)
            if offered_query is not None and not getattr(response, "prepared", False):
                response.set_cookie(COOKIE_NAME, token, httponly=True, samesite="Strict")
            return response
        if offered is None:
            code, message = "WEB_TOKEN_REQUIRED", "this MedTuning server asks for an access token"
        else:
            code, message = "WEB_TOKEN_INVALID", "the access token in the address is not this server's"
        hint = "open the address printed by 'medtuning web' (it ends with ?token=...), or ask who started it"
        return web.Response(status=403, text=refusal_page(code, message, hint), content_type="text/html",
                            headers={"X-MedTuning-Error": code})

    return gate
