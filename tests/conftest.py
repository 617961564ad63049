"""Shared fixtures. Tests that need ../shared assets skip cleanly when it is absent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "slime" / "assets" / "tiny-qwen3"
TINY_DATA = ROOT / "slime" / "assets" / "tiny_sft.jsonl"
SHARED = ROOT.parent / "shared"
QWEN3_TOKENIZER = SHARED / "assets" / "qwen3-tokenizer"
SHARED_DATA = SHARED / "data"


def load_tokenizer(path: Path = TINY):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session", autouse=True)
def private_data_cache(tmp_path_factory):
    """Token caches of the tests (and of the processes and Ray actors they start) go to a temp
    dir, never to the user's ~/.cache/slime."""
    import os

    old = os.environ.get("SLIME_DATA_CACHE_DIR")
    os.environ["SLIME_DATA_CACHE_DIR"] = str(tmp_path_factory.mktemp("sft-data-cache"))
    yield
    if old is None:
        os.environ.pop("SLIME_DATA_CACHE_DIR", None)
    else:
        os.environ["SLIME_DATA_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    if not (QWEN3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip("../shared/assets/qwen3-tokenizer not present")
    return load_tokenizer(QWEN3_TOKENIZER)


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"../shared/data/{name} not present")
    return path


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A port free on 127.0.0.1 right now (torchrun's rendezvous, Ray's ports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, worker: str, *args) -> list[str]:
    """``python -m torch.distributed.run`` of ``tests/<worker>`` on ``nproc`` local gloo ranks."""
    import sys

    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
        str(ROOT / "tests" / worker), *map(str, args),
    ]  # fmt: skip


def dist_env() -> dict:
    """The environment of a torchrun test: one OpenMP thread per rank, this checkout first."""
    import os

    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def run_torchrun(nproc: int, worker: str, *args, timeout: float):
    """`torchrun_cmd`, waited for (killed after ``timeout`` s); asserts it exited 0."""
    import subprocess

    proc = subprocess.run(torchrun_cmd(nproc, worker, *args), cwd=ROOT, env=dist_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def dry_run_flags(script: str, out: Path, **env) -> list[str]:
    """The training flags ``scripts/<script>`` prints with DRY_RUN=1 (OUT=out, plus ``env``)."""
    import os
    import subprocess

    full_env = dict(os.environ, DRY_RUN="1", OUT=str(out), **env)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script)], env=full_env, capture_output=True, text=True,
                          check=True, timeout=60)  # fmt: skip
    return proc.stdout.splitlines()
