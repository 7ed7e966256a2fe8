"""The chat page at / (issue 12, points 1 and 2): served by a real server, used in headless Chromium.

The pages talk to real server processes on 127.0.0.1 and to the real CLI
client, as people would: they type, press Enter and read what is shown
(``support.browser.Page``). Every wait is a bounded WebDriverWait.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest
from selenium.common.exceptions import NoAlertPresentException

from support.browser import PHONE, Page, chrome, require_chromium
from support.process import ClientProcess, clean_env
from support.proxy import Relay

WAIT_S = 10.0  # any one expected line or state, under a loaded machine
KEEPALIVE_S = 600  # a keepalive so slow that no test lasts long enough for it to drop anyone
XSS = "<img src=x onerror=alert(1)>"
ASSETS = {"/": "text/html", "/static/app.js": "text/javascript", "/static/style.css": "text/css"}


def get(server, path: str, host: str | None = None):
    """A plain GET: (status, headers, body)."""
    request = urllib.request.Request(f"http://{server.addr}{path}")
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


@pytest.fixture
def browsers():
    """Factory: ``browsers(server, size)`` -> a Page in a new Chromium, all quit at the end."""
    require_chromium()
    started = []

    def open_page(server, size=None) -> Page:
        driver = chrome(size) if size else chrome()
        started.append(driver)
        return Page(driver, f"http://{server.addr}")

    yield open_page
    for driver in started:
        driver.quit()


@pytest.fixture
def clients():
    started = []

    def start(*args: str) -> ClientProcess:
        client = ClientProcess(*args)
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()


def cli(clients, server, room: str, name: str) -> ClientProcess:
    return clients("--addr", f"ws://{server.addr}/ws/{room}", "--username", name)


# Serving


def test_page_and_assets_are_served_with_a_strict_policy(server):
    for path, content_type in ASSETS.items():
        status, headers, body = get(server, path)
        assert status == 200, path
        assert headers["Content-Type"] == f"{content_type}; charset=utf-8"
        assert headers["Cache-Control"] == "no-cache"
        assert headers["X-Content-Type-Options"] == "nosniff"
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self';" in policy
        assert f"connect-src 'self' ws://{server.addr} wss://{server.addr};" in policy
        assert "unsafe" not in policy
        assert body
    page = get(server, "/")[2].decode()
    # No inline script or style: every <script> has a src, and nothing reaches beyond this origin.
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", page))
    assert not re.search(r"<style|\son\w+=|https?://", page)


def test_a_host_that_is_not_plain_gets_self_only(server):
    _, headers, _ = get(server, "/", host="evil; script-src *")
    assert "connect-src 'self';" in headers["Content-Security-Policy"]
    assert "evil" not in headers["Content-Security-Policy"]


@pytest.mark.parametrize("where", ["flag", "ini", "env"])
def test_no_web_turns_the_page_off(start_server, tmp_path, where):
    ini = tmp_path / "broadcast.ini"
    ini.write_text("[server]\nno-web = true\n")
    args, env = {"flag": (["--no-web"], None), "ini": (["--config", str(ini)], None),
                 "env": ([], clean_env(BROADCAST_NO_WEB="true"))}[where]
    server = start_server(*args, env=env)
    for path in ASSETS:
        status, _, body = get(server, path)
        assert status == 404, path
        assert b"/ws" in body  # the refusal it gave before there was a page
    assert "chat page at" not in server.log


def test_the_server_says_where_the_page_is(server):
    server.wait_for_log(rf"chat page at http://127\.0\.0\.1:{server.port}/$", WAIT_S)


# Chatting


def test_two_pages_and_a_cli_client_chat_in_a_room(server, browsers, clients):
    alice = browsers(server).open("/?room=ops")
    bob = browsers(server).open("/#ops")
    assert alice.element("room").get_attribute("value") == "ops"
    assert bob.element("room").get_attribute("value") == "ops"
    alice.join("Alice")
    alice.wait_online()
    bob.join("Bob")
    bob.wait_online()
    alice.wait_notice("Bob joined")
    alice.wait_users(["Alice", "Bob"])
    bob.wait_users(["Alice", "Bob"])

    alice.send("hello from Alice")
    assert bob.wait_message("Alice", "hello from Alice") == ("Alice", "hello from Alice", False)
    assert alice.wait_message("Alice", "hello from Alice")[2], "own message not marked"
    bob.send("two\nlines")  # Shift+Enter adds a line; Enter sends both as one message
    alice.wait_message("Bob", "two\nlines")
    assert alice.element("text").get_attribute("value") == ""

    carol = cli(clients, server, "ops", "Carol")
    alice.wait_notice("Carol joined")
    carol.send("hi from the terminal")
    alice.wait_message("Carol", "hi from the terminal")
    bob.wait_message("Carol", "hi from the terminal")
    alice.send("hi Carol")
    carol.stdout.expect("[Alice] hi Carol", WAIT_S)
    alice.wait_message("Alice", "hi Carol")  # her own, back from the server: its stamp is the fourth

    # Every message carries the server's time, as a machine-readable timestamp.
    stamps = alice.driver.execute_script(
        "return [...document.querySelectorAll('#log li.msg time')].map(t => t.dateTime)")
    assert len(stamps) == 4 and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", s) for s in stamps)

    # Bob comes back: the room's history, then live, and his leaving was announced.
    bob.open("/?room=ops")
    alice.wait_notice("Bob left")
    bob.join("Bob")
    bob.wait_online()
    assert [m[:2] for m in bob.messages()] == [("Alice", "hello from Alice"), ("Bob", "two\nlines"),
                                               ("Carol", "hi from the terminal"), ("Alice", "hi Carol")]
    assert bob.messages()[1][2], "own history not marked"


def test_what_a_peer_sends_is_shown_as_text_never_as_html(server, browsers, clients):
    page = browsers(server).open("/?room=xss")
    page.join("Alice")
    page.wait_online()
    mallory = cli(clients, server, "xss", "<b>Mallory</b>")
    page.wait_notice("<b>Mallory</b> joined")
    mallory.send(XSS)
    mallory.send("after")
    page.wait_message("<b>Mallory</b>", XSS)
    page.wait_message("<b>Mallory</b>", "after")
    page.wait_users(["<b>Mallory</b>", "Alice"])
    found = page.driver.execute_script("return document.querySelectorAll('#log img, #log b, #users b').length")
    assert found == 0, "a peer's markup became elements"
    with pytest.raises(NoAlertPresentException):
        page.driver.switch_to.alert.text


def test_the_latest_message_stays_in_view_at_a_phone_width(server, browsers, clients):
    page = browsers(server, PHONE).open("/?room=phone")
    page.join("Alice")
    page.wait_online()
    bob = cli(clients, server, "phone", "Bob")
    for n in range(40):
        bob.send(f"message {n}")
    page.wait_message("Bob", "message 39")
    layout = page.driver.execute_script("""
        const wrap = document.querySelector('.log-wrap').getBoundingClientRect();
        const last = document.querySelector('#log').lastElementChild.getBoundingClientRect();
        const send = document.getElementById('send').getBoundingClientRect();
        return {overflow: document.documentElement.scrollWidth - window.innerWidth,
                lastInView: last.top >= wrap.top && last.bottom <= wrap.bottom + 1,
                scrolled: document.querySelector('.log-wrap').scrollTop > 0,
                sendInView: send.right <= window.innerWidth && send.bottom <= window.innerHeight};
    """)
    assert layout == {"overflow": 0, "lastInView": True, "scrolled": True, "sendInView": True}


# Reconnecting


def test_the_page_reconnects_and_recovers_after_a_server_restart(start_server, browsers, clients):
    server = start_server()
    page = browsers(server).open("/?room=ops")
    page.join("Alice")
    page.wait_online()
    page.send("before the restart")
    page.wait_message("Alice", "before the restart")

    server.stop()
    page.wait(lambda d: page.state()[0] == "reconnecting", "the page to say it is reconnecting")
    again = start_server("--port", str(server.port))
    page.wait_online(timeout=30)
    # The new server's history is a new one: the page says what it could not recover.
    page.wait_notice("messages may be missing (history restarted)")

    bob = cli(clients, again, "ops", "Bob")
    bob.send("after the restart")
    page.wait_message("Bob", "after the restart")
    page.send("still here")
    bob.stdout.expect("[Alice] still here", WAIT_S)
    assert [m[1] for m in page.messages()].count("before the restart") == 1


def test_the_page_recovers_what_it_missed_while_its_network_was_down(server, browsers, clients):
    relay = Relay(server.port)
    try:
        page = browsers(SimpleNamespace(addr=f"127.0.0.1:{relay.port}")).open("/?room=ops")
        page.join("Alice")
        page.wait_online()
        carol = cli(clients, server, "ops", "Carol")
        carol.send("while you were here")
        page.wait_message("Carol", "while you were here")

        last_id = page.driver.execute_script("return document.querySelector('#log li.msg:last-child').dataset.id")
        relay.down()
        page.wait(lambda d: page.state()[0] == "reconnecting", "the page to say it is reconnecting")
        carol.stdout.expect("* Alice left", WAIT_S)
        for n in range(3):
            carol.send(f"missed {n}")
            carol.stdout.expect(f"[Carol] missed {n}", WAIT_S)
        relay.up()
        page.wait_online(timeout=40)  # the backoff may have reached 8 s
        page.wait_notice("reconnected; recovered 3 messages")
        # It asked for what came after the last message it had, not for the whole history again
        # (with its session token, which finds no one to replace: its leaving was seen).
        since = re.escape(quote(last_id, safe=""))
        assert re.search(rf"/ws/ops\?username=Alice&session=[\w-]+&since={since} HTTP/1\.1$", relay.requests[-1])
        assert [m[1] for m in page.messages()] == ["while you were here", "missed 0", "missed 1", "missed 2"]
        carol.send("live again")
        page.wait_message("Carol", "live again")
    finally:
        relay.close()


def test_a_page_whose_old_connection_the_server_still_holds_takes_its_name_back_at_once(start_server, browsers):
    # Keepalive would notice the old connection only in minutes: it cannot be what brings the page back.
    server = start_server("--ping-interval", str(KEEPALIVE_S), "--ping-timeout", str(KEEPALIVE_S))
    relay = Relay(server.port)
    try:
        page = browsers(SimpleNamespace(addr=f"127.0.0.1:{relay.port}")).open("/?room=ops")
        page.join("Alice")
        page.wait_online()
        relay.down(half_open=True)  # the server still sees Alice's connection
        page.wait(lambda d: page.state()[0] == "reconnecting", "the page to say it is reconnecting")
        relay.up()
        page.wait_online()
        # Its session token took the name over: the old connection was replaced, nothing refused.
        server.wait_for_log(r"disconnect Alice@\S+: closed by server: 4000 replaced by a new connection", WAIT_S)
        assert "/ws/ops?username=Alice&session=" in relay.requests[-1]
        assert not re.search(r"refused .*409", server.log)
        assert not [n for n in page.notices() if "409" in n]
        page.send("back")
        page.wait_message("Alice", "back")
        # The session token is kept in the script's memory alone.
        assert "session" not in page.driver.current_url
        stored = page.driver.execute_script("return document.cookie + localStorage.length + sessionStorage.length")
        assert stored == "00"
    finally:
        relay.close()


# Access control


def test_a_wrong_token_gets_a_clear_error_and_the_token_stays_out_of_the_url(start_server, browsers):
    server = start_server("--token", "s3cret-token")
    page = browsers(server).open("/?room=ops")
    page.join("Alice", token="wrong-token")
    page.wait(lambda d: page.state()[0] == "offline", "the page to give up")
    problem = page.element("problem")
    assert problem.is_displayed()
    assert problem.text == "the server refused to connect: missing or invalid token"
    assert page.element("join").is_displayed()

    page.element("token").clear()
    page.join("", token="s3cret-token")  # the name is still in the form
    page.wait_online()
    page.send("with the right token")
    page.wait_message("Alice", "with the right token")
    assert "token" not in page.driver.current_url
    assert "s3cret" not in page.driver.execute_script("return location.href + document.cookie")


def test_a_name_taken_in_the_room_gets_the_servers_reason(server, browsers, clients):
    alice = cli(clients, server, "ops", "Alice")
    alice.send("here first")
    alice.stdout.expect("[Alice] here first", WAIT_S)
    page = browsers(server).open("/?room=ops")
    page.join("Alice")
    page.wait(lambda d: page.state()[0] == "offline", "the page to give up")
    assert page.element("problem").text == "the server refused to connect: name Alice is taken in room ops"


def test_allowed_origin_admits_the_page_only_when_its_origin_is_listed(start_server, browsers):
    first = start_server()
    port = first.port
    first.stop()  # its port, for a server whose list can name the page's origin
    listed = start_server("--port", str(port), "--allowed-origin", f"http://127.0.0.1:{port}")
    page = browsers(listed).open("/?room=ops")
    page.join("Alice")
    page.wait_online()
    listed.stop()

    elsewhere = start_server("--port", str(port), "--allowed-origin", "https://chat.example")
    page.open("/?room=ops")
    page.join("Alice")
    page.wait(lambda d: page.state()[0] == "offline", "the page to give up")
    assert page.element("problem").text == (
        f"the server refused this page's WebSocket: its --allowed-origin must list http://127.0.0.1:{port} "
        "(or a proxy in between does not pass WebSocket upgrades)")
    elsewhere.wait_for_log(r"refused .*: 403", WAIT_S)
