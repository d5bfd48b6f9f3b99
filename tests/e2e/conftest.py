"""End-to-end fixtures: the gateway as a child process, as it runs in production."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

RunGateway = Callable[..., "GatewayProcess"]
"""`run_gateway(config_dict, env=None, args=())`: env, if given, is added to the child's
environment; args go after `millwright run CONFIG`."""


class GatewayProcess:
    """`millwright run` in a child process, with its log kept for failure messages."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.config = config
        self._args = args
        self.log = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._env = None if env is None else {**os.environ, **env}

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", str(self.config), *self._args],
                stdout=log,
                stderr=log,
                env=self._env,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self) -> int:
        """SIGTERM and wait (without blocking the loop the simulator runs on)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while (code := self.proc.poll()) is None:
            assert time.monotonic() < deadline, f"gateway ignored SIGTERM:\n{self.text()}"
            await asyncio.sleep(0.05)
        return code

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def run_gateway(tmp_path: Path) -> Iterator[RunGateway]:
    """`run_gateway(config_dict)` writes the config and starts `millwright run` on it;
    every gateway still running at teardown is killed."""
    made: list[GatewayProcess] = []

    def start(
        config: dict[str, Any], env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> GatewayProcess:
        path = tmp_path / f"gateway-{len(made)}.yaml"
        path.write_text(yaml.safe_dump(config))
        process = GatewayProcess(path, env, args)
        made.append(process)
        process.start()
        return process

    yield start
    for process in made:
        process.close()


def assert_no_gap(seen: set[int]) -> None:
    """Every seq from 1 to the highest seen arrived."""
    missing = sorted(set(range(1, max(seen) + 1)) - seen)
    assert not missing, f"{len(missing)} seq missing, first {missing[:10]} (seen up to {max(seen)})"
