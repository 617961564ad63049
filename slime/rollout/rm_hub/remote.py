"""A reward model served over HTTP (``--rm-type remote_rm --rm-url URL``).

The server gets ``{"prompt", "response", "label"}`` (plus ``metadata``) as JSON and answers
with a number or a JSON object (then pick the field with ``--reward-key``).
"""

from __future__ import annotations

from slime.rollout.http_utils import post_json
from slime.utils.types import Sample

__all__ = ["remote_rm"]


async def remote_rm(args, sample: Sample, retries: int = 5):
    url = getattr(args, "rm_url", None)
    if not url:
        raise ValueError("--rm-type remote_rm needs --rm-url (the reward model server's URL)")
    payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label, "metadata": sample.metadata}
    return await post_json(url, payload, retries=retries)
