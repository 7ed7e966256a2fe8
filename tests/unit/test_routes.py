"""The plain HTTP route table (broadcast.net.http.route): exact paths, one segment below a "/" entry."""

from __future__ import annotations

from broadcast.net.http import route


def page(request):
    return "page"


def rooms(request):
    return "rooms"


def room(request):
    return "room"


ROUTES = {"/": page, "/rooms": rooms, "/rooms/": room}


def test_an_exact_path_and_one_segment_below_a_slash_entry_are_routed():
    assert route(ROUTES, "/") is page
    assert route(ROUTES, "/rooms") is rooms
    assert route(ROUTES, "/rooms/lobby") is room


def test_the_root_answers_only_itself_so_websocket_paths_stay_the_applications():
    for path in ("/ws", "/ws/lobby", "/favicon.ico", "/rooms/a/b"):
        assert route(ROUTES, path) is None, path
