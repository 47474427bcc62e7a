package proxy

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/keypool/keypool/internal/httpx"
)

// wsCloseGrace is how long a WebSocket client has, after keypool's close
// frame, to close its side before its connection is closed.
const wsCloseGrace = time.Second

// isEventStream reports whether a Content-Type is text/event-stream.
// It reads the media type as mime.ParseMediaType does (parameters and
// spaces ignored, case-insensitive), without allocating.
func isEventStream(ct string) bool {
	mt, _, _ := strings.Cut(ct, ";")
	return strings.EqualFold(strings.TrimSpace(mt), "text/event-stream")
}

// streamBody is an upstream response body that enforces the idle timeout
// between reads and turns a stop (see stopCause) into a final SSE event.
// ReverseProxy reads it from the handler's goroutine only.
type streamBody struct {
	rc     io.ReadCloser
	ctx    context.Context
	st     *Record
	sse    bool
	idle   time.Duration
	timer  *time.Timer // fires cancel with the idle error
	cancel context.CancelCauseFunc
	last   [2]byte // the last two bytes delivered, for event boundaries
	tail   []byte  // the final event, being delivered
	ended  bool
}

func (b *streamBody) Read(p []byte) (int, error) {
	if b.tail != nil {
		n := copy(p, b.tail)
		if b.tail = b.tail[n:]; len(b.tail) == 0 {
			b.tail, b.ended = nil, true
		}
		return n, nil
	}
	if b.ended {
		return 0, io.EOF
	}
	if b.idle > 0 {
		if b.timer == nil {
			b.timer = time.AfterFunc(b.idle, b.idleOut)
		} else {
			b.timer.Reset(b.idle)
		}
	}
	n, err := b.rc.Read(p)
	if b.timer != nil {
		b.timer.Stop()
	}
	if n > 0 {
		if n >= 2 {
			b.last = [2]byte{p[n-2], p[n-1]}
		} else {
			b.last = [2]byte{b.last[1], p[0]}
		}
	}
	if err != nil && err != io.EOF {
		if e := stopCause(b.ctx); e != nil {
			b.st.stopCode.Store(&e.Code)
			if b.sse {
				b.tail = b.finalEvent(e)
				return n, nil
			}
			return n, e
		}
	}
	return n, err
}

func (b *streamBody) idleOut() {
	b.cancel(httpx.Errorf(http.StatusGatewayTimeout, httpx.CodeUpstreamTimeout,
		"upstream of service %q sent nothing for %s", b.st.res.Service, b.idle))
}

// finalEvent is the SSE event that ends a stopped stream, starting on a
// fresh event: a stream stopped in the middle of an event gets that event
// ended (dispatched incomplete) first.
func (b *streamBody) finalEvent(e *httpx.Error) []byte {
	var out []byte
	switch {
	case b.last == [2]byte{'\n', '\n'} || b.last == [2]byte{0, 0}:
	case b.last[1] == '\n':
		out = append(out, '\n')
	default:
		out = append(out, "\n\n"...)
	}
	out = append(out, "event: error\ndata: "...)
	out = append(out, httpx.MarshalError(e)...)
	return append(out, "\n\n"...)
}

func (b *streamBody) Close() error {
	if b.timer != nil {
		b.timer.Stop()
	}
	return b.rc.Close()
}

// wsConn is the upstream side of an upgraded (WebSocket) connection. It
// follows the frames the upstream sends, so that a stop (see stopCause)
// is delivered to the client as a close frame at a frame boundary. Reads
// run on one ReverseProxy goroutine, writes on another.
type wsConn struct {
	rwc    io.ReadWriteCloser
	ctx    context.Context
	st     *Record
	frames frameTracker
	tail   []byte
	ended  bool
}

func (c *wsConn) Read(p []byte) (int, error) {
	if c.tail != nil {
		n := copy(p, c.tail)
		if c.tail = c.tail[n:]; len(c.tail) == 0 {
			c.tail, c.ended = nil, true
			c.st.closeClientSoon()
		}
		return n, nil
	}
	if c.ended {
		return 0, io.EOF
	}
	n, err := c.rwc.Read(p)
	c.frames.feed(p[:n])
	if err != nil {
		if e := stopCause(c.ctx); e != nil {
			c.st.stopCode.Store(&e.Code)
			if c.frames.atBoundary() {
				c.tail = closeFrame(e)
				return n, nil
			}
			c.st.closeClientSoon()
		}
	}
	return n, err
}

func (c *wsConn) Write(p []byte) (int, error) { return c.rwc.Write(p) }
func (c *wsConn) Close() error                { return c.rwc.Close() }

// closeFrame is an unmasked WebSocket close frame carrying e: 1008
// (policy violation) for 401 and 403, 1011 (internal error) otherwise,
// with e's message as the reason (at most 123 bytes of UTF-8).
func closeFrame(e *httpx.Error) []byte {
	code := uint16(1011)
	switch e.Status {
	case http.StatusUnauthorized, http.StatusForbidden:
		code = 1008 // policy violation
	case http.StatusServiceUnavailable:
		code = 1013 // try again later
	}
	reason := e.Message
	for len(reason) > 123 || !utf8.ValidString(reason) {
		reason = reason[:len(reason)-1]
	}
	f := make([]byte, 4, 4+len(reason))
	f[0], f[1] = 0x88, byte(2+len(reason)) // FIN, opcode close; unmasked
	binary.BigEndian.PutUint16(f[2:], code)
	return append(f, reason...)
}

// frameTracker follows WebSocket frame boundaries in a byte stream.
type frameTracker struct {
	hdr  [14]byte
	hn   int    // header bytes collected
	need int    // header length, once its first two bytes are in
	left uint64 // payload bytes still to come
}

func (f *frameTracker) feed(b []byte) {
	for len(b) > 0 {
		if f.left > 0 {
			k := uint64(len(b))
			if k > f.left {
				k = f.left
			}
			f.left -= k
			b = b[k:]
			continue
		}
		f.hdr[f.hn] = b[0]
		f.hn++
		b = b[1:]
		if f.hn == 2 {
			f.need = 2
			switch f.hdr[1] & 0x7f {
			case 126:
				f.need += 2
			case 127:
				f.need += 8
			}
			if f.hdr[1]&0x80 != 0 {
				f.need += 4 // masking key
			}
		}
		if f.hn < 2 || f.hn < f.need {
			continue
		}
		switch l := f.hdr[1] & 0x7f; l {
		case 126:
			f.left = uint64(binary.BigEndian.Uint16(f.hdr[2:4]))
		case 127:
			f.left = binary.BigEndian.Uint64(f.hdr[2:10])
		default:
			f.left = uint64(l)
		}
		f.hn, f.need = 0, 0
	}
}

// atBoundary reports whether the bytes fed so far end on a frame
// boundary.
func (f *frameTracker) atBoundary() bool { return f.hn == 0 && f.left == 0 }

// hijackConn is set by the responseRecorder when ReverseProxy hijacks the
// client connection of an upgrade.
type hijackConn struct {
	mu   sync.Mutex // protects conn and closing
	conn net.Conn
	// closing is set once the client should close: a conn hijacked
	// after it is cut at once.
	closing bool
}

// set notes c, hijacked for an upgrade: it is cut at once when the client
// should already be closing.
func (h *hijackConn) set(c net.Conn) {
	h.mu.Lock()
	h.conn = c
	if h.closing {
		_ = c.SetReadDeadline(time.Now())
	}
	h.mu.Unlock()
}

// closeClientSoon gives an upgraded client wsCloseGrace to close its side
// after keypool ended the connection, then ends the read that holds
// ReverseProxy's copy goroutine.
func (st *Record) closeClientSoon() {
	h := &st.client
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closing = true
	if h.conn != nil {
		_ = h.conn.SetReadDeadline(time.Now().Add(wsCloseGrace))
	}
}
