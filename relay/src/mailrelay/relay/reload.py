"""Hot reload: notice that the config file or a file it references changed, and apply it.

Polling with content hashes, on purpose: Kubernetes updates a mounted ConfigMap or Secret
by writing a new timestamped directory and swapping the `..data` symlink, which inotify
watches on the file itself miss, while reading through the symlink always sees the
current content. Hashing a few small files once a second costs nothing.

A change is applied only if the whole new configuration loads (the YAML, and whatever the
`apply` callback prepares: users file, TLS certificate). Otherwise the relay logs why,
counts a failed reload, and keeps the old configuration in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from mailrelay.relay.config import RelayConfig, load_config
from mailrelay.relay.metrics import RelayMetrics

__all__ = ["ConfigWatcher", "fingerprint"]

log = logging.getLogger(__name__)


def _hash_path(digest: hashlib._Hash, path: Path) -> None:
    digest.update(str(path).encode() + b"\0")
    try:
        if path.is_dir():
            for child in sorted(path.iterdir()):
                # Skip Kubernetes' bookkeeping entries (..data, ..2024_...); the visible
                # names are symlinks through ..data, so their content covers a swap.
                if not child.name.startswith(".."):
                    _hash_path(digest, child)
        else:
            digest.update(path.read_bytes())
    except OSError as exc:
        digest.update(f"unreadable:{exc.errno}".encode())
    digest.update(b"\0")


def fingerprint(config_path: Path, config: RelayConfig | None) -> str:
    """A hash of the config file and every file it references (blocking)."""
    digest = hashlib.sha256()
    _hash_path(digest, config_path)
    if config is not None:
        for path in config.referenced_files():
            _hash_path(digest, path)
    return digest.hexdigest()


class ConfigWatcher:
    """Polls the files behind the running config and calls `apply` with a new config."""

    def __init__(
        self,
        config_path: Path,
        config: RelayConfig,
        apply: Callable[[RelayConfig], Awaitable[None]],
        metrics: RelayMetrics,
        *,
        interval: float = 1.0,
    ) -> None:
        self._path = config_path
        self._config = config
        self._apply = apply
        self._metrics = metrics
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._fingerprint: str | None = None

    async def start(self) -> None:
        """Remember the current state and begin polling."""
        self._fingerprint = await asyncio.to_thread(fingerprint, self._path, self._config)
        self._task = asyncio.create_task(self._run(), name="config-watcher")

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:
                log.exception("Failed to check the configuration for changes")

    async def check(self) -> bool:
        """Reload if anything changed; True if a new config was applied."""
        current = await asyncio.to_thread(fingerprint, self._path, self._config)
        if current == self._fingerprint:
            return False
        self._fingerprint = current
        try:
            config = await asyncio.to_thread(load_config, self._path)
            await self._apply(config)
        except Exception as exc:  # whatever failed, the old config stays in force
            self._metrics.config_reloads.labels("failure").inc()
            self._metrics.config_last_reload_success.set(0)
            log.error(
                "Refused the new configuration from %s; kept the old one: %s", self._path, exc
            )
            return False
        self._config = config
        # The new config may reference other files; watch those from now on.
        self._fingerprint = await asyncio.to_thread(fingerprint, self._path, config)
        self._metrics.config_reloads.labels("success").inc()
        self._metrics.config_last_reload_success.set(1)
        log.info("Reloaded the configuration from %s", self._path)
        return True
