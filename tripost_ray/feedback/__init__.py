"""Feedback (FBK) and improvement (IMP) at scale: providers, prompts, cache, limits, costs, the pool.

Modules, one job each:

* :mod:`~tripost_ray.feedback.providers`: scripted / openai / anthropic endpoints, credentials;
* :mod:`~tripost_ray.feedback.prompts`: versioned few-shot prompts and lenient parsers;
* :mod:`~tripost_ray.feedback.cache`: the content-addressed response cache on fsspec;
* :mod:`~tripost_ray.feedback.ratelimit`: the cluster-wide rate limiter and budget actors;
* :mod:`~tripost_ray.feedback.costs`: prices, cost and reservations;
* :mod:`~tripost_ray.feedback.calls`: one call end to end (retries, outcomes);
* :mod:`~tripost_ray.feedback.pool`: the async actor pool, ``run_editing``.
"""

from tripost_ray.feedback.providers import MissingCredentialsError, check_credentials

__all__ = ["MissingCredentialsError", "check_credentials", "run_editing"]


def __getattr__(name: str):
    if name == "run_editing":  # imported lazily: the pool needs Ray
        from tripost_ray.feedback.pool import run_editing

        return run_editing
    raise AttributeError(name)
