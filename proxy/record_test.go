package proxy

import (
	"bufio"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool"
)

// TestHooksAnswerWithAProxyError: Authorize and Prepare refuse a request
// with any status, code, message and Retry-After through *Error, before
// any key is picked.
func TestHooksAnswerWithAProxyError(t *testing.T) {
	up := newUpstream(t, okScript)
	refusal := &Error{Status: http.StatusPaymentRequired, Code: "plan_required", Message: "upgrade your plan", RetryAfter: 2500 * time.Millisecond}
	for _, hook := range []string{"Authorize", "Prepare"} {
		t.Run(hook, func(t *testing.T) {
			e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, func(h *Handler) {
				if hook == "Authorize" {
					h.Authorize = func(*http.Request, string, string) (*http.Request, error) { return nil, refusal }
				} else {
					h.Prepare = func(*http.Request, *keypool.Service, []byte) (*http.Request, []byte, error) { return nil, nil, refusal }
				}
			})
			resp, b := e.do(t, "POST", "/v1/svc/x", strings.NewReader(`{}`))
			if resp.StatusCode != 402 || errorCode(t, b) != "plan_required" || !strings.Contains(string(b), "upgrade your plan") {
				t.Errorf("got %d %s", resp.StatusCode, b)
			}
			if ra := resp.Header.Get("Retry-After"); ra != "3" {
				t.Errorf("Retry-After %q, want 3 (rounded up)", ra)
			}
			res := waitFor(t, e.done, "OnDone")
			if res.Status != 402 || res.Code != "plan_required" || res.KeyID != "" {
				t.Errorf("result %+v", res)
			}
		})
	}
	if n := len(up.Hits()); n != 0 {
		t.Errorf("%d upstream hits, want none", n)
	}
}

// TestRecordStopEndsAStreamWithTheProxyError: a hook keeps the request's
// Record and stops it while the answer streams; the client gets the
// events so far and a final error event with the *Error, and OnDone sees
// the record's key and the stop's code.
func TestRecordStopEndsAStreamWithTheProxyError(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request, key string, n int) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		io.WriteString(w, "data: {\"n\":1}\n\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	recs := make(chan *Record, 1)
	e := newProxy(t, up.URL, keypool.Bearer, []string{"good"}, func(h *Handler) {
		h.Prepare = func(r *http.Request, svc *keypool.Service, body []byte) (*http.Request, []byte, error) {
			rec := RecordOf(r.Context())
			rec.Data = "mine"
			recs <- rec
			return nil, nil, nil
		}
	})
	req, _ := http.NewRequest("GET", e.srv.URL+"/v1/svc/stream", nil)
	req.Header.Set("Authorization", "Bearer "+teamToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if line, _ := br.ReadString('\n'); line != "data: {\"n\":1}\n" {
		t.Fatalf("first line %q", line)
	}
	rec := waitFor(t, recs, "the record")
	if rec.Data != "mine" || rec.Result().KeyID != "good" {
		t.Errorf("record: data %v, result %+v", rec.Data, rec.Result())
	}
	rec.Stop(&Error{Status: http.StatusForbidden, Code: "forbidden", Message: "access withdrawn"})
	rest, _ := io.ReadAll(br)
	if !strings.Contains(string(rest), "event: error\ndata: {\"error\":{\"message\":\"access withdrawn\",\"type\":\"permission_error\",\"code\":\"forbidden\"}}\n\n") {
		t.Errorf("rest of the stream %q", rest)
	}
	res := waitFor(t, e.done, "OnDone")
	if res.KeyID != "good" || res.Code != "forbidden" || res.Status != 200 {
		t.Errorf("result %+v", res)
	}
	rec.Stop(&Error{Status: 500}) // after the end: nothing happens
}
