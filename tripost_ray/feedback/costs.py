"""Tokens and money: prices from the config's table, conservative estimates for reservations.

Cost is computed from the usage each reply reports (``input_tokens``/``output_tokens``)
and :class:`~tripost_ray.config.Price` (USD per million tokens). Before a call is sent
the budget and the tokens-per-minute window need a number, so :func:`estimate_tokens`
over-estimates the prompt (characters / 3) and the reply is assumed to use all of
``max_tokens``: a reservation can only be too large, never too small, so the budget is
never overrun by calls in flight.
"""

from __future__ import annotations

import math

from tripost_ray.config import ConfigError, Price, ProviderConfig


def price_for(prices: dict[str, Price], cfg: ProviderConfig) -> Price | None:
    """The price of ``cfg.model`` (the scripted provider is free), or None when unlisted."""
    if cfg.provider == "scripted":
        return Price()
    return prices.get(cfg.model)


def require_price(prices: dict[str, Price], cfg: ProviderConfig, section: str) -> Price:
    """The model's price; with a budget set an unpriced model is a config error (no guessing)."""
    price = price_for(prices, cfg)
    if price is None:
        raise ConfigError(
            f"{section}.model {cfg.model!r} has no entry in editing.prices, so editing.max_usd cannot be enforced; "
            f"add editing.prices.{cfg.model}.input_per_mtok / output_per_mtok (listed: {sorted(prices)})"
        )
    return price


def cost_usd(price: Price | None, input_tokens: int, output_tokens: int) -> float:
    """USD for one reply's usage (0 for an unpriced model: reported as such in the summary)."""
    if price is None:
        return 0.0
    return (input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok) / 1e6


def estimate_tokens(text: str) -> int:
    """An upper-leaning token estimate of a prompt: one token per 3 characters."""
    return max(1, math.ceil(len(text) / 3))


def reservation(price: Price | None, prompt_text: str, max_tokens: int) -> tuple[int, float]:
    """(tokens, usd) to reserve before a call: the estimated prompt plus a full-length reply."""
    tokens_in = estimate_tokens(prompt_text)
    return tokens_in + max_tokens, cost_usd(price, tokens_in, max_tokens)
