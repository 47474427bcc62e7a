package proxy

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/keypool/keypool/internal/httpx"
)

func frame(masked bool, payload []byte) []byte {
	var f []byte
	f = append(f, 0x81)
	mask := byte(0)
	if masked {
		mask = 0x80
	}
	switch n := len(payload); {
	case n < 126:
		f = append(f, mask|byte(n))
	case n < 1<<16:
		f = append(f, mask|126, byte(n>>8), byte(n))
	default:
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		f = append(append(f, mask|127), b[:]...)
	}
	if masked {
		f = append(f, 1, 2, 3, 4)
	}
	return append(f, payload...)
}

// The frame tracker finds frame boundaries however the bytes are split.
func TestFrameTracker(t *testing.T) {
	frames := [][]byte{
		frame(false, []byte("hi")),
		frame(false, nil),
		frame(true, bytes.Repeat([]byte("x"), 300)),
		frame(false, bytes.Repeat([]byte("y"), 70000)),
	}
	stream := bytes.Join(frames, nil)
	ends := map[int]bool{}
	total := 0
	for _, f := range frames {
		total += len(f)
		ends[total] = true
	}
	for _, chunk := range []int{1, 3, 7, 1000, len(stream)} {
		t.Run(fmt.Sprintf("chunks of %d", chunk), func(t *testing.T) {
			var ft frameTracker
			for i := 0; i < len(stream); i += chunk {
				j := min(i+chunk, len(stream))
				ft.feed(stream[i:j])
				if got := ft.atBoundary(); got != ends[j] {
					t.Fatalf("after %d bytes: boundary %v, want %v", j, got, ends[j])
				}
			}
		})
	}
}

func TestCloseFrame(t *testing.T) {
	for _, tc := range []struct {
		err  *httpx.Error
		code uint16
	}{
		{httpx.Errorf(http.StatusUnauthorized, httpx.CodeInvalidToken, "token revoked"), 1008},
		{httpx.Errorf(http.StatusServiceUnavailable, httpx.CodeUnavailable, "key disabled"), 1013},
		{httpx.Errorf(http.StatusGatewayTimeout, httpx.CodeUpstreamTimeout, "%s", strings.Repeat("é", 100)), 1011},
	} {
		f := closeFrame(tc.err)
		if f[0] != 0x88 || int(f[1]) != len(f)-2 || f[1] > 125 {
			t.Fatalf("header % x for %d bytes", f[:2], len(f))
		}
		if got := binary.BigEndian.Uint16(f[2:]); got != tc.code {
			t.Errorf("code %d, want %d", got, tc.code)
		}
		if !strings.HasPrefix(tc.err.Message, string(f[4:])) {
			t.Errorf("reason %q", f[4:])
		}
	}
}

// The final SSE event starts on a fresh event whatever the stream was
// doing.
func TestFinalEvent(t *testing.T) {
	e := httpx.Errorf(http.StatusUnauthorized, httpx.CodeInvalidToken, "token revoked")
	want := "event: error\ndata: {\"error\":{\"message\":\"token revoked\",\"type\":\"authentication_error\",\"code\":\"invalid_token\"}}\n\n"
	for _, tc := range []struct{ sent, prefix string }{
		{"", ""},
		{"data: 1\n\n", ""},
		{"data: 1\n", "\n"},
		{"data: 1", "\n\n"},
	} {
		b := &streamBody{}
		if n := len(tc.sent); n >= 2 {
			b.last = [2]byte{tc.sent[n-2], tc.sent[n-1]}
		}
		if got := string(b.finalEvent(e)); got != tc.prefix+want {
			t.Errorf("after %q: %q", tc.sent, got)
		}
	}
}
