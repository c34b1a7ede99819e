"""Pretraining objectives: each a pure function (params, batch, rng) -> (loss, metrics)."""
