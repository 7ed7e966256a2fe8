"""Make contrib/chat-page.png, the README's picture of the chat page, with the browser tests' own setup.

    python tests/support/screenshot.py

A real server on 127.0.0.1, two CLI clients and the page in headless
Chromium (``support.browser``), exactly as tests/e2e/test_page.py drives it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the support package

from support.browser import Page, chrome  # noqa: E402
from support.process import ROOT, ClientProcess, ServerProcess  # noqa: E402

OUTPUT = ROOT / "contrib" / "chat-page.png"
SIZE = (960, 600)  # CSS pixels: wide enough for the online list beside the messages
WAIT_S = 10.0


def main() -> None:
    server = ServerProcess([])
    clients: list[ClientProcess] = []
    driver = chrome(SIZE)
    try:
        url = f"ws://{server.addr}/ws/ops"
        bob = ClientProcess("--addr", url, "--username", "Bob")
        clients.append(bob)
        bob.send("deploy of 2.4 starts in 5 minutes")
        bob.stdout.expect("[Bob] deploy", WAIT_S)
        page = Page(driver, f"http://{server.addr}").open("/?room=ops")
        page.join("Alice")
        page.wait_online()
        carol = ClientProcess("--addr", url, "--username", "Carol")
        clients.append(carol)
        page.wait_notice("Carol joined")
        carol.send("canary looks fine: p99 41 ms, no errors")
        page.wait_message("Carol", "canary looks fine: p99 41 ms, no errors")
        page.send("thanks, watching the dashboards:\n- latency\n- error rate")
        page.wait_message("Alice", "thanks, watching the dashboards:\n- latency\n- error rate")
        bob.send("<b>markup</b> is shown as text")
        page.wait_message("Bob", "<b>markup</b> is shown as text")
        page.type("rolling out to the rest")
        driver.save_screenshot(str(OUTPUT))
    finally:
        driver.quit()
        for client in clients:
            client.kill()
        server.kill()
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
