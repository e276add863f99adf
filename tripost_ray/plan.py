"""``tripost run --dry-run``: the resource plan and an LLM call / cost estimate.

Nothing is started: the plan is computed from the config alone so a platform team can
size a cluster and a budget before submitting.
"""

from __future__ import annotations

from tripost_ray.config import JobConfig, ProviderConfig


def resource_plan(cfg: JobConfig) -> list[dict]:
    """Actors, GPUs and CPUs (and memory, where reserved) each stage asks of the cluster."""
    from tripost_ray.rollout import actor_resources
    from tripost_ray.specs import JobSpecs

    r, e, t = cfg.rollout, cfg.editing, cfg.train
    rollout_memory = actor_resources(JobSpecs(cfg).rollouts(1, 0))["memory"] or 0
    return [
        {"stage": "rollouts / eval (Ray Data actor pool)", "actors": f"{r.min_actors}-{r.max_actors}",
         "gpus_each": r.num_gpus_per_actor, "cpus_each": r.num_cpus_per_actor,
         "memory_gib_each": rollout_memory / 2**30},
        {"stage": "editing (async FBK/IMP pool)", "actors": e.num_actors, "gpus_each": 0,
         "cpus_each": e.num_cpus_per_actor, "in_flight": e.num_actors * e.concurrency_per_actor},
        {"stage": "training (Ray Train + DeepSpeed ZeRO-%d)" % t.zero_stage, "actors": t.num_workers,
         "gpus_each": 1 if t.use_gpu else 0, "cpus_each": t.cpus_per_worker},
    ]


def llm_call_estimate(cfg: JobConfig) -> dict:
    """Upper bound of FBK/IMP calls and their cost.

    Per rollout: one FBK call per attempt, then up to ``max_improve_rounds`` rounds of one
    IMP and one FBK call. Directly correct outputs make no call, so real runs use less.
    Tokens per call are estimated from the rendered prompts of a sample problem.
    """
    rollouts = cfg.task.n_train * cfg.rollout.max_passes * cfg.iterations
    attempts = 1 + (cfg.rollout.self_improve_rounds if cfg.iterations > 1 else 0)
    fbk_calls = rollouts * (attempts + cfg.editing.max_improve_rounds)
    imp_calls = rollouts * cfg.editing.max_improve_rounds
    out = {"rollouts_max": rollouts, "fbk_calls_max": fbk_calls, "imp_calls_max": imp_calls}
    cost = 0.0
    for role, calls, provider in (("fbk", fbk_calls, cfg.feedback), ("imp", imp_calls, cfg.improve)):
        price = cfg.editing.prices.get(provider.model)
        tokens_in, tokens_out = _tokens_per_call(cfg, provider, role)
        if provider.provider != "scripted" and price is None:
            out[f"{role}_price"] = f"no price for model {provider.model!r} in editing.prices"
            continue
        if price is not None:
            cost += calls * (tokens_in * price.input_per_mtok + tokens_out * price.output_per_mtok) / 1e6
    out["usd_max"] = round(cost, 2)
    out["budget_usd"] = cfg.editing.max_usd
    return out


def _tokens_per_call(cfg: JobConfig, provider: ProviderConfig, role: str) -> tuple[int, int]:
    if provider.provider == "scripted":
        return 0, 0
    try:
        from tripost_ray.feedback.prompts import estimate_prompt_tokens

        return estimate_prompt_tokens(cfg.task.name, role, cfg.task.difficulty)
    except ImportError:
        return 1500, provider.max_tokens


def print_plan(cfg: JobConfig) -> None:
    print("# resource plan")
    for row in resource_plan(cfg):
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    print("# LLM calls and cost (upper bound)")
    for k, v in llm_call_estimate(cfg).items():
        print(f"  {k}: {v}")
