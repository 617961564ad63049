"""Every rm_hub reward on real answer formats, the dispatcher, and the remote reward model."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from types import SimpleNamespace

import pytest

from slime.rollout.rm_hub import async_rm, batched_async_rm, rule_based_reward
from slime.rollout.rm_hub.config import RewardConfig
from slime.rollout.rm_hub.dapo import compute_score
from slime.rollout.rm_hub.deepscaler import get_deepscaler_rule_based_reward
from slime.rollout.rm_hub.f1 import f1_score
from slime.rollout.rm_hub.math_utils import is_equiv, last_boxed
from slime.utils.plugins import PluginError
from slime.utils.types import Sample


def rm_args(**kw):
    base = dict(rm_type=None, rm_url=None, custom_rm_path=None, group_rm=False, reward_key=None, eval_reward_key=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(
    "text, boxed",
    [
        (r"The answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"first \boxed{3} then \boxed{\sqrt{2}}", r"\sqrt{2}"),
        (r"\fbox{42}", "42"),
        (r"so $\boxed 7$", "7"),
        (r"unbalanced \boxed{1", None),
        ("no box here", None),
    ],
)
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    "a, b, same",
    [
        (r"\frac{1}{2}", "0.5", True),
        (r"\dfrac{3}{4}", "3/4", True),
        (r"\frac12", r"\frac{1}{2}", True),
        ("1,000,000", "1000000", True),
        (r"-\frac{1}{3}", "-1/3", True),
        (r"x = 5", "5", True),
        (r"90^\circ", "90", True),
        (r"\text{(C)}", "(C)", True),
        (r"\left( 3, -2 \right)", "(3,-2)", True),
        (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2", True),
        (r"2\pi", r"\pi \cdot 2", True),
        ("2.50", "2.5", True),
        ("(3,-2)", "[3,-2]", False),
        ("5", "6", False),
        (r"\frac{1}{3}", "0.33", False),
        ("__import__('os').getcwd()", "1", False),
    ],
)
def test_is_equiv(a, b, same):
    assert is_equiv(a, b) is same


def test_deepscaler_needs_finished_reasoning_and_a_box():
    good = r"<think>Let me add: 17 + 25 = 42.</think> The sum is $\boxed{42}$."
    assert get_deepscaler_rule_based_reward(good, "42") == 1
    assert get_deepscaler_rule_based_reward(good, r"\boxed{42}") == 1  # label written as a solution
    assert get_deepscaler_rule_based_reward(good, "41") == 0
    assert get_deepscaler_rule_based_reward(r"<think>still thinking \boxed{42}", "42") == 0  # no </think>
    assert get_deepscaler_rule_based_reward("<think>x</think> 42", "42") == 0  # no box
    # The box inside the reasoning does not count, only the final part.
    assert get_deepscaler_rule_based_reward(r"<think>\boxed{42}</think> \boxed{7}", "42") == 0
    assert get_deepscaler_rule_based_reward(r"###Response The ratio is \boxed{\dfrac{2}{3}}", "2/3") == 1


def test_dapo_answer_line():
    text = "We count the cases... 12 + 22 = 34.\nAnswer: 34"
    assert compute_score(text, "34") == {"score": 1.0, "acc": True, "pred": "34"}
    assert compute_score("Answer: $1{,}024$ ways", "1024")["acc"] is True
    assert compute_score("Answer: \\boxed{17}", "17.0")["acc"] is True
    wrong = compute_score("Answer: 35", "34")
    assert wrong["score"] == -1.0 and wrong["pred"] == "35"
    assert compute_score("I am not sure.", "34") == {"score": -1.0, "acc": False, "pred": "[INVALID]"}
    # Only the final answer line counts.
    assert compute_score("Answer: 34\nWait, recheck.\nAnswer: 36", "34")["acc"] is False
    assert compute_score(r"... so \boxed{34}", "34", strict_box_verify=True)["acc"] is True


def test_f1():
    f1, p, r = f1_score("The Eiffel Tower in Paris", "Eiffel Tower")
    # articles are dropped: 4 prediction tokens, 2 shared
    assert p == 0.5 and r == 1.0 and f1 == pytest.approx(2 / 3)
    assert f1_score("yes", "no")[0] == 0.0
    assert f1_score("Yes.", "yes")[0] == 1.0
    assert f1_score(None, "x") == (0.0, 0.0, 0.0)
    assert f1_score("completely different", "Eiffel Tower")[0] == 0.0


def test_dispatch_by_rm_type_and_metadata_and_boxed_prefix():
    s = Sample(index=0, response=r"<think>..</think> so \boxed{\frac{1}{4}}", label="0.25")
    assert asyncio.run(async_rm(rm_args(rm_type="deepscaler"), s)) == 1
    assert asyncio.run(async_rm(rm_args(rm_type="math"), s)) == 1
    s.metadata = {"rm_type": "f1"}  # per-sample override
    assert asyncio.run(async_rm(rm_args(rm_type="deepscaler"), s)) == 0.0
    s2 = Sample(index=1, response=r"The capital is \boxed{Paris}", label="Paris")
    assert rule_based_reward("boxed_f1", s2.response, s2.label) == 1.0
    s3 = Sample(index=2, response="Answer: 7", label="7")
    assert asyncio.run(async_rm(rm_args(rm_type="dapo", reward_key="score"), s3))["score"] == 1.0
    with pytest.raises(PluginError, match="reward-key"):
        asyncio.run(async_rm(rm_args(rm_type="dapo"), s3))
    with pytest.raises(ValueError, match="not a built-in reward"):
        rule_based_reward("nope", "x", "y")


def test_reward_config_checks():
    with pytest.raises(ValueError, match="choose one of"):
        RewardConfig(rm_type="accuracy")
    with pytest.raises(ValueError, match="--rm-url"):
        RewardConfig(rm_type="remote_rm")
    with pytest.raises(ValueError, match="--reward-key score"):
        RewardConfig(rm_type="dapo")
    with pytest.raises(ValueError, match="--group-rm needs --custom-rm-path"):
        RewardConfig(group_rm=True)
    assert RewardConfig(rm_type="boxed_f1").rm_type == "boxed_f1"


@pytest.fixture()
def reward_server():
    """A remote reward model over HTTP: scores exact-match against the label, echoes what it got."""
    from aiohttp import web

    seen = []

    async def score(request):
        body = await request.json()
        seen.append(body)
        return web.json_response({"score": float(body["response"].strip() == body["label"]), "seen": True})

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = web.Application()
    app.router.add_post("/score", score)
    runner = web.AppRunner(app)

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    yield f"http://127.0.0.1:{port}/score", seen
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)


def test_remote_rm(reward_server):
    url, seen = reward_server
    args = rm_args(rm_type="remote_rm", rm_url=url, reward_key="score")
    samples = [
        Sample(index=i, prompt="2+2?", response=r, label="4", metadata={"k": i}) for i, r in enumerate(["4", "5"])
    ]
    rewards = asyncio.run(batched_async_rm(args, samples))
    assert [r["score"] for r in rewards] == [1.0, 0.0]
    assert json.loads(json.dumps(seen[0]))["prompt"] == "2+2?" and {b["metadata"]["k"] for b in seen} == {0, 1}
