"""API keys for the editing actors: named in the config, read from the driver's
environment, handed to the actors in memory only.

Ray writes some of what it is given to disk or into tables anyone with dashboard access
can read, and a key must reach none of them:

* a ``runtime_env`` (``env_vars`` included) is logged in plain text by the runtime-env
  agent (``runtime_env_agent.log``, every node, kept after the run) and, for a job,
  stored in the job table;
* an actor's creation arguments are kept by the GCS (to restart the actor), which
  persists them when GCS fault tolerance is on.

A method call's arguments and small return values travel only in Ray's RPC messages
between the two processes (inlined, never in the object store, so never spilled) and
are not logged. So the driver reads the keys the config names (``api_key_env`` or the
provider's default variable) from its own environment, puts them into one
:class:`KeyHolder` actor with one call, and each editing actor fetches the keys it needs
by name when it starts (again after a restart). This works the same on a local cluster,
inside ``ray job submit`` and on KubeRay: only the driver's process needs the keys (on
KubeRay the head pod, where a job's driver runs, gets them from a Secret); worker nodes
never need them in their environment.
"""

from __future__ import annotations

import os
from typing import Any

from tripost_ray.feedback.providers import MissingCredentialsError


class KeyHolder:
    """Holds the run's API keys in memory (a Ray actor with no CPU; see the module doc)."""

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}

    def put(self, keys: dict[str, str]) -> None:
        self._keys.update(keys)

    def get(self, names: list[str]) -> dict[str, str]:
        missing = [n for n in names if n not in self._keys]
        if missing:
            raise MissingCredentialsError(f"no key was handed over for {missing} (the driver did not need them)")
        return {n: self._keys[n] for n in names}


def start_key_holder(names: list[str]) -> Any:
    """A :class:`KeyHolder` actor loaded with the driver's values of ``names`` (all must be
    set: :func:`~tripost_ray.feedback.providers.check_credentials` checked that)."""
    import ray

    holder = ray.remote(KeyHolder).options(num_cpus=0, max_restarts=0).remote()
    ray.get(holder.put.remote({n: os.environ[n] for n in names}))
    return holder


def fetch_keys(holder: Any, names: list[str]) -> dict[str, str]:
    """The values of ``names`` from a key holder (called inside an editing actor)."""
    import ray

    return ray.get(holder.get.remote(list(names))) if names else {}
