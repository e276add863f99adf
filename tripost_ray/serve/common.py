"""What every tripost Ray Serve application shares: the key check, the loopback default, the
port check, the cluster-wide proxy, request validation and OpenAI-style errors and events.

The teacher (:mod:`tripost_ray.serve.teacher`) and the model server
(:mod:`tripost_ray.serve.model`) are both a FastAPI ingress on Serve's one HTTP proxy per
cluster; each says no the same way:

* **Key**: ``Authorization: Bearer <key>`` or ``x-api-key: <key>``, compared with the key's
  SHA-256 (only the digest is given to a replica, so no secret sits in the Serve config).
  A host other than loopback is refused without a key.
* **Port**: a port any other process listens on (a second cluster's Serve included) is
  refused before Serve starts; a running proxy is reused, and another explicit host or port
  for it is refused (the proxy is cluster-wide), as is a second app of a running app's name.
* **Requests**: a strict pydantic model of the fields an app understands (any other field
  is refused); a malformed field, a body that is not a JSON object or a model name the app
  does not serve gets a 400 naming the field and the reason, as does a body over the app's
  limit (read no further than the limit).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
from typing import Annotated, Any, Literal, Optional, Tuple, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from ray import serve

from tripost_ray.config import ConfigError


class ServeError(ConfigError):
    """An app cannot be started as asked (one line for the CLI: it is a ConfigError)."""


class RequestError(ValueError):
    """A request an app refuses; ``status`` (a 4xx) and the message say why."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


# ---------------------------------------------------------------------- requests


def _text(value: Any) -> str:
    """A message's text: a string or a list of text blocks; anything else is refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                       and isinstance(b.get("text"), str) for b in value):
        return "".join(b["text"] for b in value)
    raise ValueError("must be a string or a list of {'type': 'text', 'text': ...} blocks")


def _stops(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise ValueError("must be a string or a list of strings")


Text = Annotated[str, BeforeValidator(_text)]
Stops = Annotated[Optional[list[str]], BeforeValidator(_stops)]
Tokens = Annotated[Optional[int], Field(ge=1)]


class StrictRequest(BaseModel):
    """A request body: strict types, and a field the app does not understand is refused."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Message(BaseModel):
    """A chat message: strict types; fields other than role and content are ignored (e.g. ``name``)."""

    model_config = ConfigDict(strict=True, extra="allow")


class OpenAIMessage(Message):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text


class StreamOptions(StrictRequest):
    include_usage: bool = False


R = TypeVar("R", bound=BaseModel)


def parse_body(raw: bytes, model: type[R]) -> R:
    """The validated request, or a :class:`RequestError` naming the first bad field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(f"the body is not JSON ({err})") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "body"
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise RequestError(f"{field}: {msg}{more}") from None


async def read_body(request: Request, limit: int, setting: str) -> bytes:
    """The request body, refused (400) past ``limit`` bytes without reading it all;
    ``setting`` names the config field that sets the limit."""
    too_big = f"request body exceeds the server's limit of {limit} bytes ({setting})"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(too_big, 400, "request_too_large")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise RequestError(too_big, 400, "request_too_large")
    return bytes(raw)


def sse(data: dict | str, event: str | None = None) -> str:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def error_response(api: str, status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """An error body in the API's own format (``api``: ``openai`` or ``anthropic``)."""
    if api == "anthropic":
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def unauthorized(api: str) -> JSONResponse:
    kind = "authentication_error" if api == "anthropic" else "invalid_api_key"
    return error_response(api, 401, kind, "invalid or missing API key")


# --------------------------------------------------------------------- the key


def key_digest(api_key: str | None) -> str | None:
    """What a replica is given of the key: its SHA-256 (None: no key is checked)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def authorized(request: Request, key_sha256: str | None) -> bool:
    """Whether the request carries the key (``Authorization: Bearer`` or ``x-api-key``)."""
    if key_sha256 is None:
        return True
    presented = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        presented = presented or auth[7:].strip()
    digest = hashlib.sha256(presented.encode()).hexdigest()
    return hmac.compare_digest(digest, key_sha256)


# ------------------------------------------------------------------- lifecycle


def running_proxy() -> Optional[Tuple[str, int]]:
    """(host, port) of the cluster's Serve HTTP proxy when Serve is running, else None."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    http = client.http_config
    return http.host, int(http.port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_open_host(host: str, api_key: str | None) -> None:
    """A host reachable from other machines is served only with a key."""
    if not is_loopback(host) and not api_key:
        raise ServeError(f"host {host!r} is reachable from other machines: serving there needs a key "
                         "(--api-key-env NAME, the variable holding it), or bind 127.0.0.1")


def check_port_free(host: str, port: int, setting: str = "--port") -> None:
    """Refuse a port another process listens on, in one line (``setting``: where to change it).

    Binding is the only reliable test: Ray Serve's proxy binds with ``SO_REUSEPORT``, so a
    second cluster's proxy on the same port would *start* beside the first and the kernel
    would spread requests over both; this probe binds without it and so fails then.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no owner
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ServeError(f"{host}:{port} is already in use ({err.strerror}): another teacher, Ray Serve "
                             f"instance or program serves it; choose another port ({setting})") from None


def start_proxy(host: str, port: int | None, name: str, route_prefix: str, *, replace_existing: bool = False,
                setting: str = "--port") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (a free port when None), or reuse the
    cluster's running one; returns the root URL ``http://host:port<route_prefix>`` an app
    named ``name`` will have (for a host of ``0.0.0.0`` it names 127.0.0.1, where this
    machine's clients reach it). Refuses a taken port, another explicit host or port than
    the running proxy's, and (unless ``replace_existing``) a second app of a running name."""
    if not route_prefix.startswith("/"):
        raise ConfigError(f"route_prefix must start with '/', got {route_prefix!r}")
    running = running_proxy()
    if running is None:
        port = port or free_port(host)
        check_port_free(host, port, setting)
        serve.start(http_options={"host": host, "port": port})
    else:
        run_host, run_port = running
        if (port is not None and port != run_port) or host != run_host:
            raise ServeError(
                f"Ray Serve already runs its HTTP proxy on {run_host}:{run_port} (one per cluster); "
                f"cannot serve on {host}:{port}. Leave port unset to reuse it, or serve.shutdown() first."
            )
        host, port = run_host, run_port
        if name in serve.status().applications and not replace_existing:
            raise ServeError(f"a Serve application named {name!r} already runs on this cluster "
                             f"({run_host}:{run_port}); stop it (serve.delete({name!r})) or choose another name")
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{url_host}:{port}{route_prefix.rstrip('/')}"


def openai_base_url(root: str) -> str:
    """The ``base_url`` an OpenAI client uses for an app at ``root``."""
    return root.rstrip("/") + "/v1"
