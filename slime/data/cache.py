"""The on-disk token cache: one `TokenStore` per (data content, tokenizer, flags, code).

Layout under the cache root (``--data-cache-dir``, default `default_cache_dir`)::

    v1/<key>/                   a complete store (see slime.data.store), never modified
    v1/.tmp-<key>-<host>-<pid>-<rand>/   a store being written; renamed to <key> when complete
    file-hashes/<path hash>.json         content hash of a file, valid while its stat is unchanged

The key hashes everything that changes samples: the bytes of the data file(s) (not their
path: a copy hits the same entry), the tokenizer files and chat template, the data flags
(columns, multi-turn policy, max length, template kwargs), the versions of tokenizers,
transformers and jinja2, and the source of the modules that encode rows, so a code change
can never serve stale tokens. ``--skip-invalid-samples`` is not in the key: the stored
report decides at load time whether the run may go on.

Content hashes are remembered per file with its size, mtime, ctime and inode: a restart
re-reads a file only when one of these changed (writing a file always changes its ctime).
A store is written into a temporary directory and renamed into place only once complete,
so a run killed midway leaves nothing that can be loaded; stale temporary directories of
dead processes on this host are removed by the next build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
from dataclasses import asdict
from importlib import metadata

logger = logging.getLogger(__name__)

__all__ = ["CACHE_VERSION", "cache_key", "commit", "default_cache_dir", "entry_dir", "file_sha256", "new_tmp_dir"]

#: Bump when the store layout (slime.data.store) changes; code that decides samples is hashed instead.
CACHE_VERSION = 1
_SUBDIR = f"v{CACHE_VERSION}"
#: Modules whose code decides the samples (their source is part of every key).
_ENCODING_MODULES = ("chat_template.py", "schema.py", "dataset.py", "prepare.py", "readers.py")
#: Files of a model directory that never affect the tokenizer (hashing weights would take minutes).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx", ".distcp")
_MAX_TOKENIZER_FILE = 256 << 20
_EXTRA_TEMPLATES = "additional_chat_templates"


def default_cache_dir() -> str:
    """``$SLIME_DATA_CACHE_DIR``, else ``$XDG_CACHE_HOME/slime/sft-data`` (``~/.cache/slime/sft-data``)."""
    if os.environ.get("SLIME_DATA_CACHE_DIR"):
        return os.environ["SLIME_DATA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "slime", "sft-data")


def stat_signature(st: os.stat_result) -> list[int]:
    """What changes whenever a file is written (ctime cannot be set back by the writer)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_sha256(path: str, cache_root: str | None = None) -> str:
    """sha256 of the file's bytes; remembered under ``cache_root`` while its stat is unchanged."""
    path = os.path.abspath(path)
    st = os.stat(path)
    record = None
    if cache_root:
        record = os.path.join(cache_root, "file-hashes", hashlib.sha256(path.encode()).hexdigest()[:32] + ".json")
        try:
            with open(record, encoding="utf-8") as f:
                known = json.load(f)
            if known.get("path") == path and known.get("stat") == stat_signature(st):
                return known["sha256"]
        except (OSError, ValueError):
            pass
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if record and stat_signature(os.stat(path)) == stat_signature(st):  # unchanged while we read it
        os.makedirs(os.path.dirname(record), exist_ok=True)
        tmp = f"{record}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"path": path, "stat": stat_signature(st), "sha256": digest}, f)
        os.replace(tmp, record)
    return digest


def _tree_hash(root: str, files: list[str], cache_root: str | None) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{file_sha256(os.path.join(root, rel), cache_root)}\0".encode())
    return h.hexdigest()


def data_hash(path: str, cache_root: str | None = None) -> str:
    """Content hash of a data file, or of every file of a ``save_to_disk`` directory."""
    if not os.path.isdir(path):  # the format follows the extension, so it is part of the identity
        return f"{file_sha256(path, cache_root)}:{os.path.splitext(path)[1].lower()}"
    files = [os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names]
    return _tree_hash(path, files, cache_root) + ":dir"


def tokenizer_hash(hf_checkpoint: str, cache_root: str | None = None) -> str:
    """Hash of what `AutoTokenizer.from_pretrained(hf_checkpoint)` reads.

    A local directory: every top-level file except weights (tokenizer files, chat
    templates, config.json, which can pick the tokenizer class) and the extra chat
    templates. Anything else (a hub id): the loaded tokenizer's own serialization and chat
    template.
    """
    if os.path.isdir(hf_checkpoint):
        files = []
        for sub in ("", _EXTRA_TEMPLATES):  # where from_pretrained looks; other folders are not read
            folder = os.path.join(hf_checkpoint, sub)
            if not os.path.isdir(folder):
                continue
            for n in os.listdir(folder):
                full = os.path.join(folder, n)
                if (n.startswith(".") or n.endswith(_WEIGHT_SUFFIXES) or not os.path.isfile(full)
                        or os.path.getsize(full) > _MAX_TOKENIZER_FILE):
                    continue
                files.append(os.path.join(sub, n))
        return _tree_hash(hf_checkpoint, files, cache_root)
    from slime.data.config import load_tokenizer

    tok = load_tokenizer(hf_checkpoint)
    h = hashlib.sha256(type(tok).__name__.encode())
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tok.chat_template, tok.special_tokens_map], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _code_hash() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in _ENCODING_MODULES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(cfg, data_path: str, cache_root: str | None) -> tuple[str, dict]:
    """(key, the description it hashes) for the samples of ``data_path`` under ``cfg``'s flags."""
    desc = {
        "cache_version": CACHE_VERSION,
        "data": data_hash(data_path, cache_root),
        "tokenizer": tokenizer_hash(cfg.hf_checkpoint, cache_root),
        "keys": asdict(cfg.keys),
        "policy": cfg.policy,
        "max_length": cfg.max_length,
        "chat_template_kwargs": cfg.chat_template_kwargs,
        "versions": {p: _version(p) for p in ("tokenizers", "transformers", "jinja2", "numpy")},
        "code": _code_hash(),
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return key, desc


def entry_dir(cache_root: str, key: str) -> str:
    return os.path.join(cache_root, _SUBDIR, key)


def new_tmp_dir(cache_root: str, key: str) -> str:
    """A fresh private directory to write the entry ``key`` into (then `commit` it)."""
    parent = os.path.join(cache_root, _SUBDIR)
    os.makedirs(parent, exist_ok=True)
    _sweep_stale(parent)
    path = os.path.join(parent, f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path)
    return path


def commit(tmp: str, cache_root: str, key: str) -> str:
    """Atomically publish a complete store; if another process published ``key`` first, use theirs."""
    final = entry_dir(cache_root, key)
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # an equal entry won the race
    return final


def discard(path: str) -> None:
    """Move an unusable entry out of the way (renamed first, so no reader sees it half-deleted)."""
    trash = f"{path}.bad-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(parent: str) -> None:
    """Remove temporary directories left by dead processes of this host (killed builds)."""
    host = socket.gethostname()
    for name in os.listdir(parent):
        if ".bad-" in name:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            continue
        if not name.startswith(".tmp-"):
            continue
        parts = name.rsplit("-", 3)  # .tmp-<key>-<host>-<pid>-<rand>; the host may contain '-'
        try:
            pid = int(parts[-2])
        except (ValueError, IndexError):
            continue
        owner_host = name[len(".tmp-") + 33 : -(len(parts[-1]) + len(parts[-2]) + 2)]
        if owner_host == host and pid != os.getpid() and not _pid_alive(pid):
            logger.info("removing the unfinished data cache entry of a dead process: %s", name)
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
