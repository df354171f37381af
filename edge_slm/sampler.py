"""Choosing the next token from logits: greedy, or temperature with top-k,
top-p and a repetition penalty, from a seeded generator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ModelError, is_whole

# Beyond these a setting repeats greedy decoding or draws noise; the sampler
# stays exact anywhere inside them, whatever the logits.
TEMPERATURE_RANGE = (1e-3, 100.0)   # or 0: greedy
REPEAT_PENALTY_RANGE = (1e-2, 100.0)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0    # 0 means greedy: always the most likely token
    top_k: int = 40             # keep the k most likely (0 = all)
    top_p: float = 0.95         # then the smallest set with this much probability
    repeat_penalty: float = 1.0  # > 1 discourages tokens seen in the last repeat_last_n
    repeat_last_n: int = 64
    seed: int | None = None     # None draws a fresh seed

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repeat_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        low, high = TEMPERATURE_RANGE
        if self.temperature != 0 and not low <= self.temperature <= high:
            raise ValueError(f"temperature must be 0 (greedy) or from {low:g} to {high:g}, "
                             f"got {self.temperature:g}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("top_k", "repeat_last_n", "seed"):  # numpy insists on whole numbers
            value = getattr(self, name)
            if not (is_whole(value, 0) or name == "seed" and value is None):
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        low, high = REPEAT_PENALTY_RANGE
        if not low <= self.repeat_penalty <= high:
            raise ValueError(f"repeat_penalty must be from {low:g} to {high:g}, got {self.repeat_penalty:g}")


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """llama.cpp's rule: shrink positive logits, grow negative ones (in
        float64, where no finite float32 logit times the penalty overflows)."""
        cfg = self.cfg
        if cfg.repeat_penalty == 1.0 or not history or cfg.repeat_last_n == 0:
            return logits
        seen = np.unique(np.asarray(history[-cfg.repeat_last_n:], dtype=np.int64))
        out = logits.astype(np.float64)
        v = out[seen]
        out[seen] = np.where(v > 0, v / cfg.repeat_penalty, v * cfg.repeat_penalty)
        return out

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token. Logits that are NaN or +inf anywhere (a model file
        with broken weights or settings) are a ModelError: there is nothing
        to choose by, and argmax would pick the first NaN as if it were best."""
        top = logits.max()
        if not np.isfinite(top):
            raise ModelError(f"the model computed logits that are not finite ({top}): "
                             f"its weights or settings are broken")
        logits = self.penalize(logits, history)
        cfg = self.cfg
        if cfg.temperature == 0.0:
            return int(np.argmax(logits))
        ids = np.arange(logits.shape[0])
        if 0 < cfg.top_k < logits.shape[0]:
            ids = np.argpartition(logits, -cfg.top_k)[-cfg.top_k:]
        chosen = logits[ids].astype(np.float64)
        order = np.argsort(-chosen)
        ids, chosen = ids[order], chosen[order]
        # The largest subtracted before scaling: every exponent is <= 0, and
        # the largest is exp(0) = 1, so nothing overflows and the sum is >= 1.
        p = np.exp((chosen - chosen[0]) / cfg.temperature)
        p /= p.sum()
        if cfg.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), cfg.top_p)) + 1
            ids, p = ids[:keep], p[:keep] / p[:keep].sum()
        return int(self.rng.choice(ids, p=p))
