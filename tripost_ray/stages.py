"""Resumable stages: each writes its outputs, then a manifest, atomically.

A stage is complete exactly when its ``_MANIFEST.json`` exists. The manifest holds the
hash of the config sections the stage depends on, chained with the hashes of the stages
it consumes, so a changed config invalidates that stage and everything downstream.
Re-running a run skips complete stages (no recompute, no LLM call paid twice); a stage
whose config changed is an error unless the run is forced.

The manifest also records the size of every file the stage wrote, so a resume notices a
truncated or replaced output before a later stage reads it. A stage whose manifest is
unreadable or whose outputs are damaged is an error naming the file; ``--force``
recomputes it (its folder is cleared first: nothing of the damaged attempt is reused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tripost_ray import progress, storage
from tripost_ray.config import ConfigError

log = logging.getLogger("tripost")

MANIFEST = "_MANIFEST.json"
#: The manifest format; 2: stage hashes are hashes of typed stage specs (tripost_ray.specs).
#: A manifest of another format was hashed another way and cannot be compared.
MANIFEST_FORMAT = 2


class StageConfigChanged(ConfigError):
    """A finished stage was produced with another config; re-run with --force to redo it."""


class StageDamaged(storage.DamagedFileError):
    """A finished stage's manifest or outputs cannot be trusted; re-run with --force to redo it."""


class StageNotRun(Exception):
    """Raised by a checking :class:`Run` at the first stage that would have to run."""


@dataclass
class Run:
    """A run folder (any fsspec URL) and the bookkeeping of its stages."""

    root: str
    force: bool = False
    #: Only check the stages already on disk: raise :class:`StageNotRun` instead of running
    #: one, so a run that will be refused is refused before it writes anything.
    check_only: bool = False
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
            problem = self._check_done(name, stage_url, manifest_url, chained)
            if problem is None:
                self._notify(name, self.manifests[name])
                return self.manifests[name]
            if not self.force:
                raise problem
            if self.check_only:
                raise StageNotRun(name)
            log.warning("stage %s: recomputing (--force): %s", name, problem)
            storage.remove(stage_url)
        if self.check_only:
            raise StageNotRun(name)
        log.info("stage %-28s running", name)
        started = time.time()
        with progress.stage(name):
            payload = body(stage_url)
        manifest = {
            "stage": name,
            "format": MANIFEST_FORMAT,
            "config_hash": chained,
            "started_at": started,
            "wall_s": round(time.time() - started, 3),
            **payload,
            "files": storage.file_sizes(stage_url),
        }
        storage.write_json(manifest_url, manifest)
        manifest["skipped"] = False
        self.manifests[name] = manifest
        log.info("stage %-28s finished in %.1fs", name, manifest["wall_s"])
        self._notify(name, manifest)
        return manifest

    def _check_done(self, name: str, stage_url: str, manifest_url: str, chained: str) -> Exception | None:
        """None when the finished stage can be skipped (and is recorded as such); else the
        error that says why not: a damaged manifest or output, or a changed config."""
        try:
            manifest = storage.read_json(manifest_url)
        except storage.DamagedFileError as err:
            return StageDamaged(f"stage {name!r}: {err}; re-run with --force to recompute the stage")
        if manifest.get("format") != MANIFEST_FORMAT:
            return StageConfigChanged(
                f"stage {name!r} of run {self.root} was written by an older tripost-ray (manifest format "
                f"{manifest.get('format', 1)}, now {MANIFEST_FORMAT}); use a new run_name, or --force to recompute it")
        if manifest.get("config_hash") != chained:
            return StageConfigChanged(
                f"stage {name!r} of run {self.root} was produced with a different config "
                f"(hash {manifest.get('config_hash')} != {chained}); use a new run_name, or --force to recompute it"
            )
        if "files" in manifest:  # manifests written before sizes were recorded are trusted as they are
            found = storage.file_sizes(stage_url)
            for rel, size in manifest["files"].items():
                if found.get(rel) != size:
                    state = "missing" if rel not in found else f"{found[rel]} bytes, the manifest recorded {size}"
                    return StageDamaged(f"stage {name!r}: output {storage.join(stage_url, rel)} is damaged ({state}); "
                                        "re-run with --force to recompute the stage")
        log.info("stage %-28s done (skipped)", name)
        manifest["skipped"] = True
        self.manifests[name] = manifest
        return None

    def _notify(self, name: str, manifest: dict) -> None:
        if self.on_stage is not None:
            self.on_stage(name, manifest)


def _chain(own: str, upstream: list[str]) -> str:
    return hashlib.sha256(json.dumps([own, *upstream]).encode()).hexdigest()[:16]
