"""Resumable stages: each writes its outputs, then a manifest, atomically.

A stage is complete exactly when its ``_MANIFEST.json`` exists. The manifest holds the
hash of the config sections the stage depends on, chained with the hashes of the stages
it consumes, so a changed config invalidates that stage and everything downstream.
Re-running a run skips complete stages (no recompute, no LLM call paid twice); a stage
whose config changed is an error unless the run is forced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tripost_ray import storage
from tripost_ray.config import ConfigError

log = logging.getLogger("tripost")

MANIFEST = "_MANIFEST.json"


class StageConfigChanged(ConfigError):
    """A finished stage was produced with another config; re-run with --force to redo it."""


@dataclass
class Run:
    """A run folder (any fsspec URL) and the bookkeeping of its stages."""

    root: str
    force: bool = False
    manifests: dict[str, dict] = field(default_factory=dict)
    #: Called with (name, manifest) when a stage finishes or is found finished (tracking).
    on_stage: Callable[[str, dict], None] | None = None

    def url(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def stage(
        self,
        name: str,
        config_hash: str,
        body: Callable[[str], dict[str, Any]],
        *,
        inputs: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Run ``body(stage_url)`` unless the stage is already complete; return its manifest.

        ``body`` returns the manifest payload (counts, timings, tokens, cost, output
        paths). ``inputs`` names the stages it consumes; their hashes join this one's.
        """
        chained = _chain(config_hash, [self.manifests[i]["config_hash"] for i in inputs])
        stage_url = self.url(name)
        manifest_url = storage.join(stage_url, MANIFEST)
        if storage.exists(manifest_url):
            manifest = storage.read_json(manifest_url)
            if manifest.get("config_hash") == chained:
                log.info("stage %-28s done (skipped)", name)
                manifest["skipped"] = True
                self.manifests[name] = manifest
                self._notify(name, manifest)
                return manifest
            if not self.force:
                raise StageConfigChanged(
                    f"stage {name!r} of run {self.root} was produced with a different config "
                    f"(hash {manifest.get('config_hash')} != {chained}); use a new run_name, or --force to recompute it"
                )
            log.warning("stage %s: config changed, recomputing (--force)", name)
            storage.remove(manifest_url)
        log.info("stage %-28s running", name)
        started = time.time()
        payload = body(stage_url)
        manifest = {
            "stage": name,
            "config_hash": chained,
            "started_at": started,
            "wall_s": round(time.time() - started, 3),
            **payload,
        }
        storage.write_json(manifest_url, manifest)
        manifest["skipped"] = False
        self.manifests[name] = manifest
        log.info("stage %-28s finished in %.1fs", name, manifest["wall_s"])
        self._notify(name, manifest)
        return manifest

    def _notify(self, name: str, manifest: dict) -> None:
        if self.on_stage is not None:
            self.on_stage(name, manifest)


def _chain(own: str, upstream: list[str]) -> str:
    return hashlib.sha256(json.dumps([own, *upstream]).encode()).hexdigest()[:16]
