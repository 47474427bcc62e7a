package server_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// hang blocks until the request is canceled (or 10 s pass).
func hang(r *http.Request) {
	select {
	case <-r.Context().Done():
	case <-time.After(10 * time.Second):
	}
}

// stats returns the pool's stats of a service's key by id.
func keyFailures(k *kp, service, id string) uint64 {
	st, _ := k.srv.Pool().Stats(service)
	for _, s := range st {
		if s.ID == id {
			return s.Failures
		}
	}
	return 0
}

// Issue 16 item 6: an upstream that sent its headers after 150 s held the
// client 150 s, with no failover. Each service now has a header timeout
// (per attempt: a Failure of the key, then the next key), an idle timeout
// between body reads and an overall deadline.
func TestUpstreamTimeouts(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch key := bearerKey(r.Header); {
		case key == keyA: // never answers
			hang(r)
		case strings.HasSuffix(r.URL.Path, "/stream"): // one event, then silence
			w.Header().Set("Content-Type", "text/event-stream")
			_, _ = io.WriteString(w, "data: {\"n\":1}\n\n")
			w.(http.Flusher).Flush()
			hang(r)
		case strings.HasSuffix(r.URL.Path, "/half"): // half a JSON body, then silence
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Content-Length", "100")
			_, _ = io.WriteString(w, `{"partial":`)
			w.(http.Flusher).Flush()
			hang(r)
		default:
			okJSON(w, r)
		}
	})
	k := startKP(t)
	k.addService("slow", up.URL, "bearer", map[string]any{"header_timeout": "150ms", "idle_timeout": 0.2, "request_timeout": "3s", "selector": "ordered"})
	idA := k.addKey("slow", keyA, nil)
	k.addKey("slow", keyB, map[string]any{"priority": 10})
	k.addService("hung", up.URL, "bearer", map[string]any{"header_timeout": "150ms"})
	k.addKey("hung", keyA, nil)
	k.addService("deadline", up.URL, "bearer", map[string]any{"request_timeout": "300ms"})
	k.addKey("deadline", keyA, nil)
	team := k.addTeam("t", nil)
	tok := k.addToken(team, nil)

	call := func(path string) (int, string, time.Duration) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "POST", k.url+path, strings.NewReader(`{"model":"m"}`))
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/json")
		start := time.Now()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, "<read error: " + err.Error() + ">", time.Since(start)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			b = append(b, "<read error: "+err.Error()+">"...)
		}
		return resp.StatusCode, string(b), time.Since(start)
	}

	t.Run("header timeout fails over", func(t *testing.T) {
		before := keyFailures(k, "slow", idA)
		code, body, took := call("/v1/slow/x")
		if code != 200 || !strings.Contains(body, "chatcmpl") {
			t.Fatalf("%d %s", code, body)
		}
		if took < 150*time.Millisecond || took > 2*time.Second {
			t.Errorf("took %s, want about the 150ms header timeout", took)
		}
		if keyFailures(k, "slow", idA) != before+1 {
			t.Errorf("the slow key's failures went %d → %d, want one more", before, keyFailures(k, "slow", idA))
		}
	})
	t.Run("no key answers in time", func(t *testing.T) {
		code, body, took := call("/v1/hung/x")
		if code != 504 || !strings.Contains(body, `"code":"upstream_timeout"`) {
			t.Fatalf("%d %s, want 504 upstream_timeout", code, body)
		}
		if took > 2*time.Second {
			t.Errorf("took %s", took)
		}
	})
	t.Run("overall deadline", func(t *testing.T) {
		code, body, took := call("/v1/deadline/x")
		if code != 504 || !strings.Contains(body, `"code":"upstream_timeout"`) {
			t.Fatalf("%d %s, want 504 upstream_timeout", code, body)
		}
		if took < 300*time.Millisecond || took > 2*time.Second {
			t.Errorf("took %s, want about the 300ms deadline", took)
		}
	})
	t.Run("stream idle", func(t *testing.T) {
		code, body, took := call("/v1/slow/stream")
		if code != 200 || !strings.Contains(body, `data: {"n":1}`) ||
			!strings.Contains(body, "event: error\ndata: {\"error\":") || !strings.Contains(body, `"code":"upstream_timeout"`) {
			t.Fatalf("%d %q, want the event and a final error event", code, body)
		}
		if took < 200*time.Millisecond || took > 2*time.Second {
			t.Errorf("took %s, want about the 200ms idle timeout", took)
		}
	})
	t.Run("body idle", func(t *testing.T) {
		// A body of known length is not flushed before it ends: the
		// client sees the connection cut, with or without the headers.
		code, body, took := call("/v1/slow/half")
		if code != 200 && code != 0 || !strings.Contains(body, "<read error") {
			t.Fatalf("%d %q, want a cut body", code, body)
		}
		if took > 2*time.Second {
			t.Errorf("took %s", took)
		}
	})

	for _, tc := range []struct {
		name string
		body map[string]any
	}{
		{"negative", map[string]any{"header_timeout": "-1s"}},
		{"not a duration", map[string]any{"idle_timeout": "soon"}},
		{"too long", map[string]any{"request_timeout": "48h"}},
	} {
		t.Run("admin "+tc.name, func(t *testing.T) {
			code, m, _ := k.do("PATCH", "/admin/services/slow", k.admin, tc.body)
			if code != 400 || errCode(m) != "bad_request" {
				t.Errorf("%d %v, want 400", code, m)
			}
		})
	}
	code, m, _ := k.do("GET", "/admin/services/slow", k.admin, nil)
	if code != 200 || m["header_timeout"] != "150ms" || m["idle_timeout"] != "200ms" || m["request_timeout"] != "3s" {
		t.Errorf("GET service: %d %v", code, m)
	}
}
