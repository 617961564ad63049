"""Per-request sampling: SGLang's ``sampling_params`` checked into a typed object, and the math.

Log-probs (``return_logprob``) follow SGLang's default, which is also what slime's trainer
computes for the policy: ``log_softmax(logits / temperature)`` over the whole vocabulary, before
top-k / top-p / min-p truncation; greedy requests (temperature 0) use the raw logits. With
``original=True`` (``--cpu-engine-return-original-logprob``, SGLang's
``SGLANG_RETURN_ORIGINAL_LOGPROB=1``) it is ``log_softmax(logits)`` for every request.

Each request draws its randomness from its own ``torch.Generator`` (one uniform number per
token, on the CPU), so its output depends on its seed alone, not on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingParams", "log_probs", "sample_next"]

# SGLang treats temperatures below this as greedy.
GREEDY_EPS = 1e-6

# Accepted because SGLang clients send them, but only at their neutral value: the CPU engine does
# not implement them and must not pretend to.
_NEUTRAL = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "n": 1,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "custom_params": None,
    "logit_bias": None,
}
# Harmless for a non-streaming server: accepted and ignored.
_IGNORED = ("stream_interval",)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling, with SGLang's names and defaults.

    temperature 0 is greedy; top_k -1 (or 0) keeps the whole vocabulary; stop: strings ending
    the output (trimmed from ``text`` unless no_stop_trim); stop_token_ids / the model's EOS ids
    (unless ignore_eos) end it on a token; sampling_seed makes the request reproducible.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    sampling_seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"sampling_params.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling_params.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"sampling_params.top_k must be -1 (off) or >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"sampling_params.min_p must be in [0, 1], got {self.min_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"sampling_params.stop must be non-empty strings, got {list(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @classmethod
    def from_request(cls, params: dict | None) -> "SamplingParams":
        """Check a request's ``sampling_params``; unknown or unsupported keys are errors naming the key."""
        params = dict(params or {})
        for key, neutral in _NEUTRAL.items():
            if key in params:
                value = params.pop(key)
                if value not in (neutral, None):
                    raise ValueError(f"sampling_params.{key}={value!r} is not supported by the CPU engine")
        for key in _IGNORED:
            params.pop(key, None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown sampling_params {unknown}; supported: {sorted(known | set(_NEUTRAL))}")
        stop = params.get("stop")
        if stop is not None:
            params["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        ids = params.get("stop_token_ids")
        if ids is not None:
            params["stop_token_ids"] = (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)
        if params.get("top_k") == 0:
            params["top_k"] = -1
        try:
            return cls(**{k: v for k, v in params.items() if v is not None})
        except TypeError as e:
            raise ValueError(f"bad sampling_params: {e}") from None


def log_probs(logits, params_list, original: bool):
    """[B, V] float32 log-probs: ``log_softmax(logits / T)`` per row (T=1 for greedy or ``original``)."""
    import torch

    logits = logits.float()
    temps = [1.0 if (original or p.greedy) else p.temperature for p in params_list]
    if any(t != 1.0 for t in temps):
        logits = logits / torch.tensor(temps, dtype=logits.dtype, device=logits.device).unsqueeze(1)
    return torch.log_softmax(logits, dim=-1)


def _truncate(probs, params: SamplingParams):
    """Zero the tokens top-k / top-p / min-p remove (SGLang's rules); ``probs`` is one row [V]."""
    import torch

    if params.top_k > 0 or params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = torch.zeros_like(sorted_p, dtype=torch.bool)
        if params.top_k > 0:
            drop[params.top_k :] = True
        if params.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
            drop |= (torch.cumsum(sorted_p, 0) - sorted_p) > params.top_p
        probs = probs.clone()
        probs[order[drop]] = 0.0
    if params.min_p > 0:
        probs = torch.where(probs < probs.max() * params.min_p, torch.zeros_like(probs), probs)
    return probs


def sample_next(logits, params_list, generators) -> list[int]:
    """One next token per row of ``logits`` [B, V]; ``generators[i]`` (CPU) drives row i."""
    import torch

    out = logits.argmax(dim=-1).tolist()  # greedy rows in one op; sampled rows overwrite theirs
    for i, (row, params, gen) in enumerate(zip(logits, params_list, generators)):
        if params.greedy:
            continue
        probs = _truncate(torch.softmax(row.float() / params.temperature, dim=-1), params)
        cdf = torch.cumsum(probs, 0)
        # Inverse-CDF with one uniform from the request's own generator: the random stream
        # position is the token index, whatever the batch.
        u = torch.rand(1, generator=gen).item() * float(cdf[-1])
        idx = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype, device=cdf.device), right=True))
        # Rounding can put u at the very end; step back to the last token that has mass.
        idx = min(idx, row.numel() - 1)
        while probs[idx] <= 0 and idx > 0:
            idx -= 1
        out[i] = idx
    return out
