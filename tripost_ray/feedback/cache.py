"""A content-addressed response cache on any fsspec storage.

One JSON file per reply at ``<cache_uri>/<sha256[:2]>/<sha256>.json``. The key hashes
everything that determines a reply and nothing else: provider, model, the rendered
messages (system prompt included), the sampling parameters (temperature, max tokens,
stop strings) and the prompt version. Never the API key, the base URL or the job's
name, so re-runs, other jobs and every actor share one cache.

**Only ok replies are cached.** A 429, a 5xx, a timeout or a reply that does not parse
says something about that moment, not about the prompt; caching it would make a
transient fault permanent. A reply that parsed is stored with its reported usage, so a
cache hit can report the tokens it saved.

Writes are atomic: a local file is written under a unique temporary name and renamed
into place; object stores (s3://, gs://) make a single PUT visible all at once. Two
actors writing the same key write the same content, so the last rename wins harmlessly.
A corrupt or unreadable entry is treated as a miss (and overwritten by the next reply).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def cache_key(
    *, provider: str, model: str, system: str, messages: list[dict], temperature: float, max_tokens: int,
    stop: list[str], prompt_version: str,
) -> str:
    """sha256 of the canonical JSON of everything that determines a reply."""
    payload = {
        "provider": provider,
        "model": model,
        "system": system,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "temperature": temperature,
        "max_tokens": max_tokens,
        "stop": list(stop),
        "prompt_version": prompt_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class CachedReply:
    text: str
    input_tokens: int
    output_tokens: int


class ResponseCache:
    """get/put of replies by key; safe to use from many processes at once."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}.json"

    def get(self, key: str) -> CachedReply | None:
        path = self.path(key)
        try:
            with self.fs.open(path, "rb") as f:
                data: dict[str, Any] = json.loads(f.read())
            reply = CachedReply(str(data["text"]), int(data["input_tokens"]), int(data["output_tokens"]))
        except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
            self.misses += 1
            return None
        self.hits += 1
        return reply

    def put(self, key: str, reply: CachedReply, meta: dict | None = None) -> None:
        body = json.dumps(
            {"key": key, "text": reply.text, "input_tokens": reply.input_tokens,
             "output_tokens": reply.output_tokens, **(meta or {})},
            ensure_ascii=False,
        ).encode()
        path = self.path(key)
        if isinstance(self.fs, LocalFileSystem):
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(body)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, body)
