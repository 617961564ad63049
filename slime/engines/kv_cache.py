"""The running batch's KV cache: one HF ``DynamicCache`` with every sequence left-padded.

Each sequence's tokens are right-aligned in the cache columns, so a decode step appends one
column for the whole batch. A new sequence (prefilled alone, so it never has pad rows of its
own) joins by left-padding whichever side is shorter; finished sequences leave by row
selection, and columns that became padding for every row are dropped. Pad columns hold zeros
and are masked out by the attention mask; positions are each sequence's own token count, so
a sequence sees exactly what it would see alone.

The HF cache object is kept between steps (HF appends the new column itself) and rebuilt only
when the batch changes.
"""

from __future__ import annotations

__all__ = ["BatchKV", "build_cache", "cache_layers"]


def cache_layers(cache) -> list[tuple]:
    """[(keys, values)] per layer, each [B, kv_heads, T, head_dim], of a HF cache."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def build_cache(layers: list[tuple]):
    """A HF ``DynamicCache`` holding ``layers`` ([(keys, values)] per layer)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=layers)
    except TypeError:  # older signature
        return DynamicCache.from_legacy_cache(tuple(layers))


def _left_pad(t, cols: int):
    import torch

    if cols == 0:
        return t
    pad = torch.zeros(*t.shape[:2], cols, t.shape[3], dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


class BatchKV:
    """KV cache, attention mask and token counts of the sequences decoding together."""

    def __init__(self, device):
        self.device = device
        self.cache = None
        self.mask = None  # [B, T] int64: 1 on real tokens, 0 on left padding
        self.lengths: list[int] = []  # real tokens per row

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, layers: list[tuple], length: int) -> None:
        """Append one sequence whose cache ``layers`` are [1, H, length, D] (no padding)."""
        import torch

        new_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask, self.lengths = build_cache(layers), new_mask, [length]
            return
        width = max(self.columns, length)
        grow, pad_new = width - self.columns, width - length
        merged = [
            (torch.cat([_left_pad(k, grow), _left_pad(nk, pad_new)]), torch.cat([_left_pad(v, grow), _left_pad(nv, pad_new)]))
            for (k, v), (nk, nv) in zip(cache_layers(self.cache), layers)
        ]
        zeros = lambda rows, cols: torch.zeros(rows, cols, dtype=torch.long, device=self.device)  # noqa: E731
        self.mask = torch.cat([torch.cat([zeros(len(self), grow), self.mask], 1), torch.cat([zeros(1, pad_new), new_mask], 1)])
        self.cache = build_cache(merged)
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and drop columns that are padding for all of them."""
        import torch

        if len(rows) == len(self) and rows == list(range(len(self))):
            return
        if not rows:
            self.cache, self.mask, self.lengths = None, None, []
            return
        self.lengths = [self.lengths[r] for r in rows]
        start = self.columns - max(self.lengths)
        index = torch.tensor(rows, device=self.device)
        self.mask = self.mask[index, start:]
        layers = [(k[index, :, start:], v[index, :, start:]) for k, v in cache_layers(self.cache)]
        self.cache = build_cache(layers)

    def step_inputs(self, tokens: list[int]) -> dict:
        """Model kwargs to feed one new token per row; call `advanced` after the forward."""
        import torch

        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        mask = torch.cat([self.mask, torch.ones(len(self), 1, dtype=torch.long, device=self.device)], dim=1)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device).unsqueeze(1)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "past_key_values": self.cache}

    def advanced(self, attention_mask) -> None:
        """Record the column the forward appended (HF grew ``self.cache`` in place)."""
        self.mask = attention_mask
        self.lengths = [n + 1 for n in self.lengths]
