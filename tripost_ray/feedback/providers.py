"""Teacher endpoints behind one small interface: ``complete(prompt) -> Reply`` or a typed error.

Three providers, chosen separately for FBK and IMP (``JobConfig.feedback`` /
``JobConfig.improve``):

* ``scripted``: the task's own verifier / improver, in process (no text, no HTTP; see
  :mod:`tripost_ray.feedback.calls`);
* ``openai``: the ``openai`` SDK's ``AsyncOpenAI`` against any OpenAI-compatible
  ``base_url`` (OpenAI, vLLM, Ray Serve, the project's teacher server);
* ``anthropic``: the ``anthropic`` SDK's ``AsyncAnthropic`` (``base_url`` overridable).

**Retries are ours, not the SDKs'.** The SDK clients are built with ``max_retries=0``.
Their built-in retries would sleep and re-send *inside* one SDK call, invisible to the
cluster-wide rate limiter (a retried request would go out without a lease, so N actors
could exceed the RPM), Retry-After would pause one coroutine instead of the cluster, and
the attempt count and usage of each try would be lost to the outcome record. So each
HTTP attempt is one SDK call here, and :mod:`tripost_ray.feedback.calls` owns the loop:
lease, send, classify, back off, retry. The SDKs still do what they are good at: wire
format, auth headers, timeouts, connection pooling, typed errors, Retry-After parsing.

**Keys** come only from the environment: ``api_key_env`` or ``OPENAI_API_KEY`` /
``ANTHROPIC_API_KEY`` (of the driver; :mod:`tripost_ray.feedback.keys` hands them to the
editing actors in memory). :func:`check_credentials` fails before any work when one is
missing. A key is handed to the SDK only; it is never put in a log line, an error
message, a cache key, an outcome record, a config dump or a Ray ``runtime_env``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from tripost_ray.config import ConfigError, ProviderConfig

DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


class MissingCredentialsError(ConfigError):
    """An LLM provider is configured but its API key is not in the environment."""


@dataclass(frozen=True)
class Prompt:
    """A rendered chat prompt: a system prompt and user/assistant turns (few-shot + query).

    ``version`` names the template (part of the cache key); ``role`` is fbk or imp.
    """

    system: str
    messages: tuple[dict, ...]
    role: Literal["fbk", "imp"]
    version: str

    @property
    def text(self) -> str:
        """All prompt text (for token estimates)."""
        return self.system + "\n" + "\n".join(m["content"] for m in self.messages)

    def openai_messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system}, *[dict(m) for m in self.messages]]


@dataclass
class Reply:
    """One HTTP reply that arrived: its text, reported usage and whether the model refused."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    refused: bool = False
    finish_reason: str = ""


ErrorKind = Literal["rate_limited", "server", "timeout", "connection", "client", "auth"]
RETRYABLE: frozenset[str] = frozenset({"rate_limited", "server", "timeout", "connection"})


@dataclass
class ProviderError(Exception):
    """A call that got no usable reply. ``kind`` decides retry and the outcome status."""

    kind: ErrorKind
    detail: str
    status_code: int | None = None
    retry_after_s: float | None = None
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind} ({self.status_code}): {self.detail}"

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE


# --------------------------------------------------------------------- credentials


def key_env(cfg: ProviderConfig) -> str | None:
    """The environment variable holding this provider's key (None for scripted)."""
    if cfg.provider == "scripted":
        return None
    return cfg.api_key_env or DEFAULT_KEY_ENV[cfg.provider]


def served_by_job_teacher(job, cfg: ProviderConfig) -> bool:
    """Whether the job's own teacher server answers this provider section (``teacher.enabled``
    and no ``base_url``): its key is then minted by the job, not read from the environment."""
    return job.teacher.enabled and cfg.provider != "scripted" and cfg.base_url is None


def needed_key_names(job) -> list[str]:
    """Names of the environment variables whose values a job's driver will need (a
    :class:`~tripost_ray.config.JobConfig` before it runs; the job's own teacher needs none)."""
    names = [key_env(c) for c in (job.feedback, job.improve) if not served_by_job_teacher(job, c)]
    return sorted({n for n in names if n})


def check_credentials(cfg) -> list[str]:
    """Fail before any work when a configured LLM provider has no key in the environment.

    ``cfg`` is a :class:`~tripost_ray.config.JobConfig` (its ``feedback`` and ``improve``
    sections are checked) or a single :class:`ProviderConfig`. Returns the names of the
    environment variables the job needs (the pool hands exactly these to its actors).
    """
    sections = [("feedback", cfg.feedback), ("improve", cfg.improve)] if hasattr(cfg, "feedback") else [
        ("provider", cfg)
    ]
    needed: list[str] = []
    missing: list[str] = []
    for section, provider_cfg in sections:
        name = key_env(provider_cfg)
        if name is None:
            continue
        if not os.environ.get(name):
            missing.append(f"{section}.provider={provider_cfg.provider} needs the environment variable {name}")
        elif name not in needed:
            needed.append(name)
    if missing:
        raise MissingCredentialsError(
            "missing API key: " + "; ".join(missing)
            + " (set it in the environment, or point the section's api_key_env at the variable that holds it)"
        )
    return needed


def _api_key(cfg: ProviderConfig) -> str:
    name = key_env(cfg)
    value = os.environ.get(name or "")
    if not value:
        raise MissingCredentialsError(f"environment variable {name} is not set (needed by provider {cfg.provider})")
    return value


# ----------------------------------------------------------------------- helpers


def _retry_after(headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime
        from datetime import datetime, timezone

        try:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
        except (TypeError, ValueError):
            return None


def _classify(err: Exception, sdk) -> ProviderError:
    """Map an SDK exception (openai or anthropic: same class names) to a ProviderError."""
    if isinstance(err, sdk.APITimeoutError):
        return ProviderError("timeout", "no reply within the client timeout")
    if isinstance(err, sdk.APIConnectionError):
        return ProviderError("connection", f"connection failed: {type(err).__name__}")
    if isinstance(err, sdk.APIStatusError):
        code = err.status_code
        body = f"{err.message or ''} {err.body if err.body is not None else ''}".strip()[:300]
        headers = getattr(err.response, "headers", None)
        if code == 429:
            return ProviderError("rate_limited", body, code, _retry_after(headers))
        if code in (401, 403):
            return ProviderError("auth", body, code)
        if code in (408, 409) or code >= 500:
            return ProviderError("server", body, code, _retry_after(headers))
        return ProviderError("client", body, code)
    return ProviderError("client", f"{type(err).__name__}: {str(err)[:300]}")


# --------------------------------------------------------------------- providers


class OpenAIProvider:
    """Chat completions through ``openai.AsyncOpenAI`` (any OpenAI-compatible base_url)."""

    def __init__(self, cfg: ProviderConfig, api_key: str | None = None):
        import openai

        self.cfg = cfg
        self._sdk = openai
        self._client = openai.AsyncOpenAI(
            api_key=api_key or _api_key(cfg), base_url=cfg.base_url, timeout=cfg.timeout_s, max_retries=0
        )

    async def complete(self, prompt: Prompt) -> Reply:
        cfg = self.cfg
        kwargs = {"stop": list(cfg.stop)} if cfg.stop else {}
        try:
            resp = await self._client.chat.completions.create(
                model=cfg.model, messages=prompt.openai_messages(), temperature=cfg.temperature,
                max_tokens=cfg.max_tokens, **kwargs,
            )
        except self._sdk.OpenAIError as err:
            raise _classify(err, self._sdk) from None
        if not resp.choices:
            raise ProviderError("server", "reply without choices", 200)
        choice = resp.choices[0]
        usage = resp.usage
        refusal = getattr(choice.message, "refusal", None)
        return Reply(
            text=choice.message.content or "",
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            refused=bool(refusal) or choice.finish_reason == "content_filter",
            finish_reason=str(choice.finish_reason or ""),
        )

    async def close(self) -> None:
        await self._client.close()


class AnthropicProvider:
    """Messages through ``anthropic.AsyncAnthropic`` (``base_url`` overridable).

    The Messages API of the pinned SDK (anthropic 2.x) has no sampling ``temperature``
    parameter, so ``temperature`` is not sent here (it still keys the cache).
    """

    def __init__(self, cfg: ProviderConfig, api_key: str | None = None):
        import anthropic

        self.cfg = cfg
        self._sdk = anthropic
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key or _api_key(cfg), base_url=cfg.base_url, timeout=cfg.timeout_s, max_retries=0
        )

    async def complete(self, prompt: Prompt) -> Reply:
        cfg = self.cfg
        kwargs = {"stop_sequences": list(cfg.stop)} if cfg.stop else {}
        try:
            resp = await self._client.messages.create(
                model=cfg.model, system=prompt.system, messages=[dict(m) for m in prompt.messages],
                max_tokens=cfg.max_tokens, **kwargs,
            )
        except self._sdk.AnthropicError as err:
            raise _classify(err, self._sdk) from None
        text = "".join(getattr(block, "text", "") for block in resp.content or [] if block.type == "text")
        return Reply(
            text=text,
            input_tokens=int(resp.usage.input_tokens or 0),
            output_tokens=int(resp.usage.output_tokens or 0),
            refused=resp.stop_reason == "refusal",
            finish_reason=str(resp.stop_reason or ""),
        )

    async def close(self) -> None:
        await self._client.close()


def make_provider(cfg: ProviderConfig, api_key: str | None = None):
    """The HTTP provider of a config section (raises for scripted: it has no wire format).

    ``api_key``: the key's value when the caller has it (an editing actor gets it from the
    driver, see :mod:`tripost_ray.feedback.keys`); otherwise it is read from this
    process's environment."""
    if cfg.provider == "openai":
        return OpenAIProvider(cfg, api_key)
    if cfg.provider == "anthropic":
        return AnthropicProvider(cfg, api_key)
    raise ValueError(f"provider {cfg.provider!r} is not an HTTP provider")
