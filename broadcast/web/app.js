// The chat page: one WebSocket speaking broadcast.v1 (see the README's wire protocol).
//
// Everything a peer sends is put on the page with textContent, never as HTML.
// The token, and the session token the server gives this page's name, live
// in this script's memory and in the WebSocket's query string only: never in
// the page's URL, its history or storage (a session token kept there would
// let whoever reads the profile take the name over; a reload is a new visit).
"use strict";

const PROTOCOL = "broadcast.v1";
const DEFAULT_ROOM = "lobby"; // what /ws joins, so the page's default matches the CLI's
const ROOM_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/; // the server's rule; also keeps the URL path whole
// Reconnect backoff: doubling from the first delay up to the cap, each
// delay drawn from its upper half so that pages dropped together do not
// come back together.
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 30000;
// Closes after which trying again can help (going away, lost, server error,
// restart, try later); any other close is the server's last word.
const RETRY_CODES = new Set([1001, 1006, 1011, 1012, 1013]);
// A WebSocket refused although the same request over plain HTTP is
// accepted (426) is most likely refused for its Origin; twice running, so
// that a server that came up between the two attempts is not mistaken for it.
const UNEXPLAINED_LIMIT = 2;
const STICK_PX = 48; // this near the bottom, the reader follows the latest message
const MAX_ENTRIES = 2000; // lines kept on the page (and ids remembered), so a long session stays light
const CLOSE_LEAVING = 1000; // the page closes its own socket (another room, or a stale attempt)

const $ = (id) => document.getElementById(id);

const chat = {
  name: "",
  room: "",
  token: "",
  session: "", // the server's session token for this name here: a reconnection takes the name back with it
  ws: null,
  lastId: null, // the last id seen, handed back as ?since= to recover
  seen: new Set(), // ids of messages on the page: recovery never shows one twice
  users: new Map(), // name -> connections with that name (duplicates may be allowed)
  anonymous: 0,
  attempt: 0, // reconnect attempts since the last one that got the room's presence
  unexplained: 0,
  timer: null,
  joinedOnce: false, // a presence has arrived on some connection of this room
  recovered: 0, // history replayed on this connection
  attemptId: 0, // which connect() is current: a late answer to an older one is dropped
};

function setState(state, text) {
  const el = $("state");
  el.dataset.state = state;
  el.textContent = text;
}

function showProblem(text) {
  const el = $("problem");
  el.textContent = text;
  el.hidden = !text;
}

function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams({ username: chat.name });
  if (chat.token) query.set("token", chat.token);
  if (chat.session) query.set("session", chat.session);
  if (chat.lastId) query.set("since", chat.lastId);
  return `${scheme}//${location.host}/ws/${chat.room}?${query}`;
}

function connect() {
  clearTimeout(chat.timer);
  chat.timer = null;
  setState("connecting", `connecting to ${chat.room}…`);
  const attemptId = ++chat.attemptId;
  const ws = new WebSocket(socketUrl(), PROTOCOL);
  ws.binaryType = "arraybuffer";
  chat.ws = ws;
  chat.recovered = 0;
  let opened = false;
  ws.onopen = () => {
    if (ws.protocol !== PROTOCOL) {
      stop("this server does not speak " + PROTOCOL + "; it needs the rooms protocol");
      ws.close(CLOSE_LEAVING);
      return;
    }
    opened = true;
    chat.unexplained = 0;
  };
  ws.onmessage = (event) => {
    if (chat.ws !== ws) return;
    if (typeof event.data !== "string") {
      notice(`[binary ${event.data.byteLength} bytes]`);
      return;
    }
    let obj;
    try {
      obj = JSON.parse(event.data);
    } catch (_) {
      return; // not ours to show: the protocol sends JSON objects only
    }
    if (obj && typeof obj === "object") handle(obj);
  };
  ws.onclose = (event) => {
    if (chat.ws !== ws) return;
    chat.ws = null;
    if (!opened) {
      diagnose(attemptId);
    } else if (RETRY_CODES.has(event.code)) {
      retry(event.code === 1006 ? "connection lost" : closeText(event));
    } else {
      stop("closed by the server: " + closeText(event));
    }
  };
}

function closeText(event) {
  return event.reason ? `${event.code} ${event.reason}` : String(event.code);
}

// A browser tells a page nothing about a refused WebSocket handshake, so
// the same request is made again as a plain GET, which the server answers
// with its reason (401, 409, 400, 503 ...) or, when it would take it, 426.
// The token goes in a header here, where fetch can put it. The session
// token does not go at all: this GET is admitted as the WebSocket would be,
// and with it would take the name's seat from the old connection for nothing.
async function diagnose(attemptId) {
  const query = new URLSearchParams({ username: chat.name });
  const headers = chat.token ? { Authorization: "Bearer " + chat.token } : {};
  let response;
  try {
    response = await fetch(`/ws/${chat.room}?${query}`, {
      headers, cache: "no-store", credentials: "omit", redirect: "error",
    });
  } catch (_) {
    if (attemptId === chat.attemptId) retry("server unreachable");
    return;
  }
  const reason = (await response.text().catch(() => "")).trim() || response.statusText;
  if (attemptId !== chat.attemptId) return;
  if (response.status === 426) {
    chat.unexplained += 1;
    if (chat.unexplained < UNEXPLAINED_LIMIT) {
      retry("handshake refused");
    } else {
      stop(`the server refused this page's WebSocket: its --allowed-origin must list ${location.origin}` +
           " (or a proxy in between does not pass WebSocket upgrades)");
    }
  } else if (response.status >= 500 || (response.status === 409 && chat.joinedOnce)) {
    // A 409 after a drop may be this page's own name, held until the server
    // notices that the old connection is gone (a server that gave no session token).
    retry(`${response.status} ${reason}`);
  } else {
    stop(`the server refused to connect: ${reason}`);
  }
}

function retry(why) {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** chat.attempt);
  const delay = ceiling / 2 + Math.random() * (ceiling / 2);
  chat.attempt += 1;
  setState("reconnecting", `${why}; reconnecting in ${(delay / 1000).toFixed(1)} s`);
  chat.timer = setTimeout(connect, delay);
}

// The end of this attempt to chat: the join form comes back, saying why.
function stop(why) {
  clearTimeout(chat.timer);
  chat.timer = null;
  chat.ws = null;
  setState("offline", "not connected");
  showProblem(why);
  if (chat.joinedOnce) notice(why, "problem");
  $("join").hidden = false;
}

function handle(obj) {
  if (typeof obj.id === "string") chat.lastId = obj.id;
  switch (obj.kind) {
    case "history":
      if (addMessage(obj)) chat.recovered += 1;
      break;
    case "message":
      addMessage(obj);
      break;
    case "join":
      chat.users.set(obj.from, (chat.users.get(obj.from) || 0) + 1);
      renderUsers();
      notice(`${obj.from} joined`, "presence", obj.ts);
      break;
    case "leave": {
      const left = (chat.users.get(obj.from) || 1) - 1;
      if (left > 0) chat.users.set(obj.from, left); else chat.users.delete(obj.from);
      renderUsers();
      notice(`${obj.from} left`, "presence", obj.ts);
      break;
    }
    case "presence":
      presence(obj);
      break;
    case "gap":
      notice(obj.missed === null
        ? `messages may be missing (${obj.reason})`
        : `${obj.missed} message${obj.missed === 1 ? " is" : "s are"} missing (${obj.reason})`,
      "problem", obj.ts);
      break;
    case "error":
      notice(`the server says: ${obj.reason}`, "problem", obj.ts);
      break;
    default:
      break; // a later version's kind: ignored, as the protocol asks
  }
}

// The room's presence follows its history: from here on this connection is live.
// The one it gets on joining carries its session token.
function presence(obj) {
  if (typeof obj.session === "string") chat.session = obj.session;
  chat.users = new Map();
  for (const name of obj.users) chat.users.set(name, (chat.users.get(name) || 0) + 1);
  chat.anonymous = obj.anonymous;
  renderUsers();
  if (chat.attempt > 0 && chat.joinedOnce) {
    notice(`reconnected; recovered ${chat.recovered} message${chat.recovered === 1 ? "" : "s"}`, "presence");
  }
  chat.attempt = 0;
  chat.joinedOnce = true;
  setState("online", `online in ${chat.room} as ${chat.name}`);
}

function renderUsers() {
  const list = $("users");
  const names = [...chat.users.keys()].sort();
  list.replaceChildren(...names.map((name) => {
    const li = document.createElement("li");
    li.textContent = name;
    if (name === chat.name) li.className = "own";
    return li;
  }));
  const count = [...chat.users.values()].reduce((a, b) => a + b, 0) + chat.anonymous;
  $("online-count").textContent = String(count);
  $("anonymous").textContent = chat.anonymous ? `and ${chat.anonymous} anonymous` : "";
}

function stamp(ts) {
  const time = document.createElement("time");
  const when = typeof ts === "number" ? new Date(ts * 1000) : new Date();
  time.dateTime = when.toISOString();
  time.title = when.toLocaleString();
  time.textContent = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return time;
}

// A message or history object on the page, unless its id is already there; whether it was added.
function addMessage(obj) {
  if (chat.seen.has(obj.id)) return false;
  chat.seen.add(obj.id);
  const own = obj.from === chat.name;
  const li = document.createElement("li");
  li.className = "msg" + (own ? " own" : "") + (obj.kind === "history" ? " history" : "");
  li.dataset.id = obj.id;
  const head = document.createElement("div");
  head.className = "head";
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = obj.from === null ? "anonymous" : String(obj.from);
  head.append(who);
  if (own) {
    const you = document.createElement("span");
    you.className = "you";
    you.textContent = "you";
    head.append(you);
  }
  head.append(stamp(obj.ts));
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = String(obj.text);
  li.append(head, text);
  append(li, own);
  return true;
}

function notice(text, kind = "info", ts) {
  const li = document.createElement("li");
  li.className = "notice " + kind;
  const body = document.createElement("span");
  body.textContent = text;
  li.append(stamp(ts), body);
  append(li, false);
}

// Append to the log; follow it if the reader was at its end (or wrote this).
function append(li, own) {
  const wrap = $("log").parentElement;
  const following = own || wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < STICK_PX;
  $("log").append(li);
  while ($("log").childElementCount > MAX_ENTRIES) {
    const gone = $("log").firstElementChild;
    chat.seen.delete(gone.dataset.id);
    gone.remove();
  }
  if (following) wrap.scrollTop = wrap.scrollHeight;
}

function send() {
  const box = $("text");
  const text = box.value;
  if (!text.trim()) return;
  if (!chat.ws || chat.ws.readyState !== WebSocket.OPEN) {
    notice("not connected: the message was not sent (it is still in the box)", "problem");
    return;
  }
  chat.ws.send(JSON.stringify({ kind: "message", text }));
  box.value = "";
}

function join(event) {
  event.preventDefault();
  const name = $("name").value;
  const room = $("room").value.trim() || DEFAULT_ROOM;
  if (!ROOM_NAME.test(room)) {
    showProblem("a room name is 1 to 64 letters, digits, _ . or -, starting with a letter or digit");
    return;
  }
  if (room !== chat.room || name !== chat.name) {
    chat.lastId = null;
    chat.session = "";
    chat.seen.clear();
    chat.joinedOnce = false;
    $("log").replaceChildren();
  }
  if (chat.ws) {
    const old = chat.ws;
    chat.ws = null;
    old.close(CLOSE_LEAVING);
  }
  chat.name = name;
  chat.room = room;
  chat.token = $("token").value;
  chat.attempt = 0;
  chat.unexplained = 0;
  // The room (never the token) goes in the address, to share or bookmark.
  history.replaceState(null, "", "?room=" + encodeURIComponent(room));
  $("room-title").textContent = "· " + room;
  showProblem("");
  $("join").hidden = true;
  $("chat").hidden = false;
  connect();
  $("text").focus();
}

function start() {
  let fromHash = "";
  try {
    fromHash = decodeURIComponent(location.hash.slice(1));
  } catch (_) {
    // a malformed escape: no room from the hash
  }
  $("room").value = new URLSearchParams(location.search).get("room") || fromHash || DEFAULT_ROOM;
  $("join").addEventListener("submit", join);
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  // Back online: try now rather than at the end of the backoff.
  window.addEventListener("online", () => { if (chat.timer) connect(); });
  $("name").focus();
}

start();
