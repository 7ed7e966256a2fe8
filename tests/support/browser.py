"""The chat page in Debian's headless Chromium, driven by Selenium through Debian's chromedriver.

``chrome`` starts one browser with its own fresh profile and nothing that
reaches the network on its own (no sync, no component updates, no QUIC);
``Page`` is one tab of the page at ``/``, seen as a user sees it: it types,
presses Enter and reads what is shown. Every wait is a bounded WebDriverWait.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NOT_INSTALLED = ("chromium or chromium-driver not installed: browser tests of the chat page SKIPPED "
                 "(apt-get install chromium chromium-driver)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
DESKTOP = (1000, 700)  # viewport, CSS pixels
PHONE = (390, 844)  # a common phone's viewport, CSS pixels (narrower than a headless window may be)
WAIT_S = 10.0  # any one thing the page should show; the browser shares 2 loaded cores


def require_chromium() -> None:
    """Skip, loudly, where the browser or its driver is missing."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        warnings.warn(NOT_INSTALLED)  # in the warnings summary too, not only the skip list
        pytest.skip(NOT_INSTALLED)


def chrome(size: tuple[int, int] = DESKTOP):
    """A new headless Chromium with a fresh profile (removed by ``quit``), its viewport ``size``.

    The viewport is set as DevTools' device mode sets it (a window is never
    narrower than 500 pixels, and its frame takes part of its height); a
    phone's size is emulated as a mobile screen.
    """
    profile = tempfile.mkdtemp(prefix="broadcast-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": size == PHONE})
    quit_driver = driver.quit

    def quit() -> None:
        try:
            quit_driver()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit
    return driver


# What the log shows, read in one call: (kind, who, text, own) per entry.
_READ_LOG = """
return [...document.querySelectorAll('#log > li')].map(li => [
  li.classList.contains('notice') ? 'notice' : 'message',
  li.querySelector('.who') ? li.querySelector('.who').textContent : null,
  li.classList.contains('notice') ? li.querySelector('span').textContent : li.querySelector('.text').textContent,
  li.classList.contains('own'),
]);
"""


class Page:
    """The page at ``base_url`` in ``driver``, used as a person would."""

    def __init__(self, driver, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    def open(self, suffix: str = "/") -> Page:
        self.driver.get(self.base_url + suffix)
        self.wait(lambda d: d.execute_script("return document.readyState") == "complete", "the page to load")
        return self

    def wait(self, condition, what: str, timeout: float = WAIT_S):
        return WebDriverWait(self.driver, timeout).until(condition, f"waited {timeout}s for {what}; "
                                                                    f"state: {self.state()!r}, log: {self.log()}")

    def element(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def join(self, name: str, room: str | None = None, token: str | None = None) -> None:
        """Fill the join form as a user would (the room only if given: else what the URL put there)."""
        self.element("name").send_keys(name)
        if room is not None:
            self.element("room").clear()
            self.element("room").send_keys(room)
        if token is not None:
            self.element("token").send_keys(token)
        self.element("connect").click()

    def wait_online(self, timeout: float = WAIT_S) -> None:
        self.wait(lambda d: self.state()[0] == "online", "the page to be online", timeout)

    def state(self) -> tuple[str, str]:
        """The connection state as shown: (its data-state, its text)."""
        el = self.element("state")
        return el.get_attribute("data-state"), el.text

    def type(self, *keys: str) -> None:
        self.element("text").send_keys(*keys)

    def send(self, text: str) -> None:
        """Type ``text`` (lines joined by Shift+Enter) and press Enter."""
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if i:
                self.type(Keys.SHIFT, Keys.ENTER, Keys.SHIFT)  # the second SHIFT releases it
            self.type(line)
        self.type(Keys.ENTER)

    def log(self) -> list[tuple[str, str | None, str, bool]]:
        return [tuple(entry) for entry in self.driver.execute_script(_READ_LOG)]

    def messages(self) -> list[tuple[str | None, str, bool]]:
        return [(who, text, own) for kind, who, text, own in self.log() if kind == "message"]

    def notices(self) -> list[str]:
        return [text for kind, _, text, _ in self.log() if kind == "notice"]

    def wait_message(self, who: str | None, text: str, timeout: float = WAIT_S) -> tuple:
        """Wait until a message from ``who`` reading exactly ``text`` is shown; (who, text, own)."""
        def shown(_):
            return next((m for m in self.messages() if m[0] == who and m[1] == text), False)
        return self.wait(shown, f"message {text!r} from {who}", timeout)

    def wait_notice(self, part: str, timeout: float = WAIT_S) -> str:
        def shown(_):
            return next((n for n in self.notices() if part in n), False)
        return self.wait(shown, f"a notice with {part!r}", timeout)

    def users(self) -> list[str]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#users li')].map(li => li.textContent)")

    def wait_users(self, names: list[str], timeout: float = WAIT_S) -> None:
        self.wait(lambda d: self.users() == names, f"online list {names}", timeout)
