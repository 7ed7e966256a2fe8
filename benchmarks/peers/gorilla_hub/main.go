// A broadcast peer on the design of gorilla/websocket's examples/chat: one hub
// goroutine owns the client set, each client has a buffered send channel, a
// readPump and a writePump. Same semantics as the benchmark's other servers:
// path /ws, every message to every client including its sender, in order, no
// compression, 1 MiB messages, no keepalive. Where it departs from the
// example, the benchmark's semantics call for it, and the comment says so.
//
// Built by the benchmark with GO111MODULE=off against Debian's
// golang-github-gorilla-websocket-dev. Run: gorilla-hub -host 127.0.0.1 -port N
package main

import (
	"flag"
	"log"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/gorilla/websocket"
)

const (
	// Time allowed to write a message to the peer (the example's).
	writeWait = 10 * time.Second
	// Maximum message size allowed from a peer: the other servers' 1 MiB.
	maxMessageSize = 1024 * 1024
	// Messages a client may be behind before the hub drops it, the example's.
	// Go allocates the channel whole at connect, so the benchmark raises it
	// (-send-buffer) only where its fan-out window keeps more in flight.
	defaultSendBufferMsgs = 256
)

var upgrader = websocket.Upgrader{
	ReadBufferSize:  1024,
	WriteBufferSize: 1024,
}

// Hub maintains the set of active clients and broadcasts messages to them.
type Hub struct {
	clients    map[*Client]bool
	broadcast  chan []byte
	register   chan *Client
	unregister chan *Client
}

func newHub() *Hub {
	return &Hub{
		broadcast:  make(chan []byte),
		register:   make(chan *Client),
		unregister: make(chan *Client),
		clients:    make(map[*Client]bool),
	}
}

func (h *Hub) run() {
	for {
		select {
		case client := <-h.register:
			h.clients[client] = true
		case client := <-h.unregister:
			if _, ok := h.clients[client]; ok {
				delete(h.clients, client)
				close(client.send)
			}
		case message := <-h.broadcast:
			for client := range h.clients {
				select {
				case client.send <- message:
				default: // too far behind: dropped, as in the example
					close(client.send)
					delete(h.clients, client)
				}
			}
		}
	}
}

// Client is a middleman between the websocket connection and the hub.
type Client struct {
	hub  *Hub
	conn *websocket.Conn
	send chan []byte
}

// readPump is the connection's only reader. No read deadline or pong
// handler: the benchmark runs every server without keepalive.
func (c *Client) readPump() {
	defer func() {
		c.hub.unregister <- c
		c.conn.Close()
	}()
	c.conn.SetReadLimit(maxMessageSize)
	for {
		_, message, err := c.conn.ReadMessage()
		if err != nil {
			if websocket.IsUnexpectedCloseError(err, websocket.CloseNormalClosure, websocket.CloseGoingAway,
				websocket.CloseAbnormalClosure) {
				log.Printf("error: %v", err)
			}
			break
		}
		c.hub.broadcast <- message
	}
}

// writePump is the connection's only writer. Each message is its own frame:
// the example joins queued messages into one text message with newlines,
// which would change what the receivers get.
func (c *Client) writePump() {
	defer c.conn.Close()
	for message := range c.send {
		c.conn.SetWriteDeadline(time.Now().Add(writeWait))
		if err := c.conn.WriteMessage(websocket.TextMessage, message); err != nil {
			return
		}
	}
	// The hub closed the channel.
	c.conn.SetWriteDeadline(time.Now().Add(writeWait))
	c.conn.WriteMessage(websocket.CloseMessage, []byte{})
}

func serveWs(hub *Hub, sendBuffer int, w http.ResponseWriter, r *http.Request) {
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		log.Println(err)
		return
	}
	client := &Client{hub: hub, conn: conn, send: make(chan []byte, sendBuffer)}
	client.hub.register <- client
	go client.writePump()
	go client.readPump()
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 8080, "port to listen on")
	sendBuffer := flag.Int("send-buffer", defaultSendBufferMsgs, "messages a client may be behind before it is dropped")
	flag.Parse()
	hub := newHub()
	go hub.run()
	http.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		serveWs(hub, *sendBuffer, w, r)
	})
	addr := net.JoinHostPort(*host, strconv.Itoa(*port))
	log.Fatal(http.ListenAndServe(addr, nil))
}
