package server_test

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool/server"
)

// revocationBound is how soon after the admin call that revokes it an
// open stream must end on the replica that served the call.
const revocationBound = time.Second

// streamUpstream serves an SSE stream of 250 events 20 ms apart on any
// path, and on an Upgrade a WebSocket that sends a text frame every 20 ms
// until its connection closes.
func streamUpstream(t *testing.T) *upstream { return streamUpstreamOf(t, 250) }

// streamUpstreamOf is streamUpstream with SSE streams of events events.
func streamUpstreamOf(t *testing.T, events int) *upstream {
	return newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "" {
			c, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
			_ = brw.Flush()
			go func() { _, _ = io.Copy(io.Discard, c) }()
			for i := 0; ; i++ {
				msg := fmt.Sprintf(`{"n":%d}`, i)
				if _, err := c.Write(append([]byte{0x81, byte(len(msg))}, msg...)); err != nil {
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		if strings.HasSuffix(r.URL.Path, "/hang") {
			hang(r)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range events {
			if _, err := fmt.Fprintf(w, "data: {\"n\":%d}\n\n", i); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
	})
}

// openSSE starts a stream and reads its first event.
func openSSE(t *testing.T, k *kp, tok string) (*http.Response, *bufio.Reader) {
	t.Helper()
	req, _ := http.NewRequest("POST", k.url+"/v1/live/v1/chat/completions", strings.NewReader(`{"stream":true}`))
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != 200 {
		t.Fatalf("stream: %d", resp.StatusCode)
	}
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(line, "data: ") {
		t.Fatalf("first event: %q %v", line, err)
	}
	return resp, br
}

// openWS upgrades and reads the first frame.
func openWS(t *testing.T, k *kp, tok string) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(k.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	fmt.Fprintf(conn, "GET /v1/live/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer %s\r\n\r\n", tok)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	if op, _, err := readFrame(br); err != nil || op != 1 {
		t.Fatalf("first frame: opcode %d, %v", op, err)
	}
	return conn, br
}

// readFrame reads one unmasked WebSocket frame with a short payload.
func readFrame(br *bufio.Reader) (opcode byte, payload []byte, err error) {
	var h [2]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return 0, nil, err
	}
	n := int(h[1] & 0x7f)
	if h[1]&0x80 != 0 || n > 125 {
		return 0, nil, fmt.Errorf("unexpected frame header % x", h)
	}
	payload = make([]byte, n)
	_, err = io.ReadFull(br, payload)
	return h[0] & 0x0f, payload, err
}

// Issue 16 item 7: after a token was revoked (or its key disabled) an open
// WebSocket stayed up 22 s and an open SSE stream delivered all 250
// events. Revoking a token, deleting its team or user, or disabling or
// deleting the serving key now ends them within the revocation bound:
// SSE with a final error event, WebSockets with a 1008 close frame.
func TestRevocationEndsStreams(t *testing.T) {
	up := streamUpstream(t)
	k := startKP(t)
	k.addService("live", up.URL, "bearer", map[string]any{"idle_timeout": "5s"})

	type subject struct{ tok, tokenID, teamID, userID, keyID string }
	n := 0
	newSubject := func(viaUser bool) subject {
		n++
		var s subject
		s.keyID = k.addKey("live", fmt.Sprintf("sk-live-%02d-xxxxxxxxxxxxxxxxxxxxxxxx", n), nil)
		s.teamID = k.addTeam(fmt.Sprintf("team-%d", n), nil)
		body := map[string]any{"name": "t", "team_id": s.teamID}
		if viaUser {
			u := k.mustAdmin("POST", "/admin/users", map[string]any{"external_id": fmt.Sprintf("u%d@example.com", n), "team_id": s.teamID}, 201)
			s.userID = u["id"].(string)
			body = map[string]any{"name": "t", "user_id": s.userID}
		}
		m := k.mustAdmin("POST", "/admin/tokens", body, 201)
		s.tok, s.tokenID = m["token"].(string), m["id"].(string)
		k.secrets = append(k.secrets, s.tok)
		return s
	}
	// Each subject's streams are served by its own key: disable the
	// others so the pool picks it.
	only := func(s subject) {
		st, _ := k.srv.Pool().Stats("live")
		for _, ks := range st {
			status := "disabled"
			if ks.ID == s.keyID {
				status = "active"
			}
			k.mustAdmin("PATCH", "/admin/keys/"+ks.ID, map[string]any{"status": status}, 200)
		}
	}

	for _, tc := range []struct {
		name    string
		viaUser bool
		revoke  func(s subject)
		code    string
		message string
	}{
		{"token revoked", false, func(s subject) {
			k.mustAdmin("PATCH", "/admin/tokens/"+s.tokenID, map[string]any{"is_active": false}, 200)
		}, "invalid_token", "token revoked"},
		{"token deleted", false, func(s subject) { k.mustAdmin("DELETE", "/admin/tokens/"+s.tokenID, nil, 204) }, "invalid_token", "token"},
		{"team deleted", false, func(s subject) { k.mustAdmin("DELETE", "/admin/teams/"+s.teamID, nil, 204) }, "invalid_token", ""},
		{"user deleted", true, func(s subject) { k.mustAdmin("DELETE", "/admin/users/"+s.userID, nil, 204) }, "invalid_token", ""},
		{"key disabled", false, func(s subject) {
			k.mustAdmin("PATCH", "/admin/keys/"+s.keyID, map[string]any{"status": "disabled"}, 200)
		}, "", "key"},
		{"key deleted", false, func(s subject) { k.mustAdmin("DELETE", "/admin/keys/"+s.keyID, nil, 204) }, "", "key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSubject(tc.viaUser)
			only(s)
			_, sse := openSSE(t, k, s.tok)
			ws, wsr := openWS(t, k, s.tok)

			start := time.Now()
			tc.revoke(s)

			// SSE: the events stop and a final error event ends the stream.
			rest, err := io.ReadAll(sse)
			took := time.Since(start)
			if err != nil {
				t.Fatalf("SSE read: %v", err)
			}
			body := string(rest)
			if strings.Count(body, "data: {\"n\"") > 60 || strings.Contains(body, "[DONE]") {
				t.Errorf("the stream went on after the revocation: %d more events", strings.Count(body, "data: "))
			}
			i := strings.Index(body, "event: error\ndata: ")
			if i < 0 || !strings.HasSuffix(body, "\n\n") || !strings.Contains(body[i:], tc.message) ||
				tc.code != "" && !strings.Contains(body[i:], `"code":"`+tc.code+`"`) {
				t.Fatalf("SSE ended without the final error event: %q", body[max(0, len(body)-300):])
			}
			if took > revocationBound {
				t.Errorf("SSE ended %s after the revocation, bound %s", took, revocationBound)
			}

			// WebSocket: frames stop and a 1008 close frame arrives.
			_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
			for {
				op, payload, err := readFrame(wsr)
				if err != nil {
					t.Fatalf("WebSocket ended without a close frame: %v", err)
				}
				if op == 1 {
					continue
				}
				if op != 8 || len(payload) < 2 {
					t.Fatalf("frame opcode %d % x", op, payload)
				}
				code, reason := binary.BigEndian.Uint16(payload), string(payload[2:])
				want := uint16(1008)
				if tc.code == "" {
					want = 1013
				}
				if code != want || !strings.Contains(reason, tc.message) {
					t.Errorf("close frame %d %q, want %d with %q", code, reason, want, tc.message)
				}
				break
			}
			wsTook := time.Since(start)
			if wsTook > revocationBound {
				t.Errorf("WebSocket closed %s after the revocation, bound %s", wsTook, revocationBound)
			}
			t.Logf("SSE ended %s and the WebSocket got its close frame %s after the admin call began", took, wsTook)
			if _, err := wsr.ReadByte(); err == nil {
				t.Error("the WebSocket connection stayed open after its close frame")
			}
		})
	}

	// A request still waiting for its upstream's headers is answered 401.
	t.Run("before the headers", func(t *testing.T) {
		s := newSubject(false)
		only(s)
		seen := len(up.seen())
		type answer struct {
			code int
			m    map[string]any
		}
		done := make(chan answer, 1)
		go func() {
			req, _ := http.NewRequest("POST", k.url+"/v1/live/hang", strings.NewReader("{}"))
			req.Header.Set("Authorization", "Bearer "+s.tok)
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				done <- answer{0, map[string]any{"err": err.Error()}}
				return
			}
			defer resp.Body.Close()
			var m map[string]any
			_ = json.NewDecoder(resp.Body).Decode(&m)
			done <- answer{resp.StatusCode, m}
		}()
		eventually(t, "the request to reach the upstream", func() bool { return len(up.seen()) > seen })
		start := time.Now()
		k.mustAdmin("PATCH", "/admin/tokens/"+s.tokenID, map[string]any{"is_active": false}, 200)
		select {
		case a := <-done:
			if a.code != 401 || errCode(a.m) != "invalid_token" {
				t.Errorf("%d %v, want 401 invalid_token", a.code, a.m)
			}
			if took := time.Since(start); took > revocationBound {
				t.Errorf("answered %s after the revocation", took)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the pending request was not ended")
		}
	})

	// A change that revokes nothing ends nothing.
	s := newSubject(false)
	only(s)
	_, sse := openSSE(t, k, s.tok)
	k.mustAdmin("PATCH", "/admin/tokens/"+s.tokenID, map[string]any{"name": "renamed"}, 200)
	rest, err := io.ReadAll(sse)
	if err != nil || !strings.Contains(string(rest), "[DONE]") || strings.Contains(string(rest), "event: error") {
		t.Errorf("a rename cut the stream: %v %q", err, string(rest)[max(0, len(rest)-200):])
	}
	k.checkLogs()
}

// A key disabled through one replica ends the streams it serves on
// another once that replica sees the store change (within SyncInterval).
func TestKeyDisabledElsewhereEndsStreams(t *testing.T) {
	up := streamUpstream(t)
	const every = 200 * time.Millisecond
	var db server.SecretURL
	k1 := startKP(t, func(c *server.Config) { c.SyncInterval = server.Duration(every); db = c.Database })
	k2 := startKP(t, func(c *server.Config) { c.SyncInterval = server.Duration(every); c.Database = db })
	k1.addService("live", up.URL, "bearer", nil)
	id := k1.addKey("live", keyA, nil)
	tok := k1.addToken(k1.addTeam("t", nil), nil)
	eventually(t, "replica 2 loads the key", func() bool { st, _ := k2.srv.Pool().Stats("live"); return len(st) == 1 })

	_, sse := openSSE(t, k2, tok)
	start := time.Now()
	k1.mustAdmin("PATCH", "/admin/keys/"+id, map[string]any{"status": "disabled"}, 200)
	rest, err := io.ReadAll(sse)
	took := time.Since(start)
	if err != nil || !strings.Contains(string(rest), "event: error\ndata: ") || strings.Contains(string(rest), "[DONE]") {
		t.Fatalf("stream on replica 2: %v %q", err, string(rest)[max(0, len(rest)-300):])
	}
	if took > 2*every+time.Second {
		t.Errorf("replica 2 ended the stream %s after the key was disabled; sync interval %s", took, every)
	}
	t.Logf("replica 2 ended the stream %s after the key was disabled on replica 1 (sync interval %s)", took, every)
}

// 100 SSE streams and 100 WebSockets of one token all end within the
// revocation bound.
func TestRevocationEndsManyStreams(t *testing.T) {
	// Streams of a minute: opening 200 streams under -race on a loaded
	// machine can take longer than the usual 5 s stream, which would end
	// on its own before the revocation.
	up := streamUpstreamOf(t, 3000)
	k := startKP(t)
	k.addService("live", up.URL, "bearer", nil)
	k.addKey("live", keyA, nil)
	m := k.mustAdmin("POST", "/admin/tokens", map[string]any{"name": "t", "team_id": k.addTeam("t", nil)}, 201)
	tok, tokenID := m["token"].(string), m["id"].(string)
	k.secrets = append(k.secrets, tok)

	const n = 100
	sses := make([]*bufio.Reader, n)
	wss := make([]*bufio.Reader, n)
	for i := range n {
		_, sses[i] = openSSE(t, k, tok)
		_, wss[i] = openWS(t, k, tok)
	}
	ended := make(chan string, 2*n)
	start := time.Now()
	for i := range n {
		go func() {
			rest, err := io.ReadAll(sses[i])
			if err != nil || !strings.Contains(string(rest), `"code":"invalid_token"`) {
				ended <- fmt.Sprintf("SSE %d: %v %q", i, err, string(rest)[max(0, len(rest)-100):])
				return
			}
			ended <- ""
		}()
		go func() {
			for {
				op, payload, err := readFrame(wss[i])
				switch {
				case err != nil:
					ended <- fmt.Sprintf("WebSocket %d: %v", i, err)
					return
				case op == 8 && len(payload) >= 2 && binary.BigEndian.Uint16(payload) == 1008:
					ended <- ""
					return
				case op != 1:
					ended <- fmt.Sprintf("WebSocket %d: opcode %d", i, op)
					return
				}
			}
		}()
	}
	k.mustAdmin("PATCH", "/admin/tokens/"+tokenID, map[string]any{"is_active": false}, 200)
	deadline := time.After(5 * time.Second)
	for range 2 * n {
		select {
		case msg := <-ended:
			if msg != "" {
				t.Error(msg)
			}
		case <-deadline:
			t.Fatal("streams still open 5 s after the revocation")
		}
	}
	took := time.Since(start)
	if took > revocationBound {
		t.Errorf("%d streams and %d WebSockets ended %s after the revocation, bound %s", n, n, took, revocationBound)
	}
	t.Logf("%d SSE streams and %d WebSockets ended %s after the admin call began", n, n, took)
}
