"""The status page in a real headless browser (Debian's chromium, driven by Playwright; no
browser download): it shows every device live, a value that changes while it is open (by
Server-Sent Events), and a device going down when its simulator stops."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from playwright.async_api import Browser, async_playwright

from gateway.broker import free_port
from simulators.modbus import ModbusSimulator
from tests.helpers import Mosquitto, running

TAGS = [
    {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel"},
    {"name": "strokes", "table": "input", "address": 10, "type": "uint32", "order": "CDAB"},
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: run `make test`, which installs it")
    async with async_playwright() as playwright:
        # --no-sandbox: the tests run as root, where chromium's sandbox refuses to start.
        launched = await playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def test_the_page_shows_the_plant_live_and_a_device_going_down(
    browser: Browser, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    press, oven = ModbusSimulator(port=0, units=(1,), seed=8), ModbusSimulator(port=0, units=(1,), seed=9)
    await press.start()
    await oven.start()
    try:
        text = yaml.safe_dump({
            "gateway": {"id": "edge-page", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "http": {"listen": listen},
            "mqtt": {"url": mosquitto.url},
            "devices": [
                {"name": name, "protocol": "modbus", "host": "127.0.0.1", "port": sim.port, "poll": "100ms",
                 "timeout": "300ms", "reconnect_max": "1s", "tags": TAGS}
                for name, sim in (("press-1", press), ("oven-1", oven))
            ],
        })  # fmt: skip
        async with running(text, tmp_path / "gw.yaml"):
            page = await browser.new_page()
            await page.goto(f"http://{listen}/")
            await page.wait_for_selector("#link.live", timeout=20_000)
            for name in ("press-1", "oven-1"):
                await page.wait_for_selector(f'[data-device="{name}"][data-state="up"]', timeout=20_000)
            strokes = '[data-device="press-1"] tr[data-tag="strokes"] td.value'
            first = await page.text_content(strokes, timeout=20_000)
            # The press strokes on: the number changes on the open page, with no reload.
            await page.wait_for_function(
                "([selector, before]) => { const e = document.querySelector(selector);"
                " return e !== null && e.textContent !== before; }",
                arg=[strokes, first], timeout=20_000,
            )  # fmt: skip
            await press.stop()
            down = await page.wait_for_selector('[data-device="press-1"][data-state="down"]', timeout=20_000)
            assert down is not None
            assert "DOWN" in (await down.text_content() or "")
            # Its tags turn Bad, and stand out; the oven is untouched.
            await page.wait_for_selector(
                '[data-device="press-1"] tr.bad[data-tag="temperature"]', timeout=20_000
            )
            assert await page.get_attribute('[data-device="oven-1"]', "data-state") == "up"
            header = await page.text_content("#gateway")
            await page.close()
    finally:
        await press.stop()
        await oven.stop()
    assert header == "Millwright edge-page"
