package meter

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"
	"time"
)

// TestReverseProxy wires the package into httputil.ReverseProxy the way
// keypoold does, against an upstream that streams SSE events one by one:
// the proxy adds include_usage, the client gets every event as soon as the
// upstream sends it and never sees the usage chunk, and OnDone gets the
// usage.
func TestReverseProxy(t *testing.T) {
	events := bytes.SplitAfter(readFixture(t, "openai_chat_stream.sse"), []byte("\n\n"))
	events = events[:len(events)-1] // SplitAfter leaves an empty tail
	next := make(chan struct{}, 1)  // the client lets the upstream send the next event
	gotBody := make(chan []byte, 1)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		gotBody <- b
		if ae := r.Header.Get("Accept-Encoding"); ae != "identity" {
			t.Errorf("Accept-Encoding = %q", ae)
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		for _, ev := range events {
			select {
			case <-next:
			case <-time.After(5 * time.Second):
				t.Error("client never asked for the next event")
				return
			}
			w.Write(ev)
			w.(http.Flusher).Flush()
		}
	}))
	defer upstream.Close()

	done := make(chan Usage, 1)
	target, _ := url.Parse(upstream.URL)
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			body, _ := io.ReadAll(pr.In.Body)
			info := InspectRequest(body)
			strip := false
			if info.Stream && AcceptsStreamOptions(pr.Out.URL.Path) {
				body, strip = EnsureStreamUsage(body)
			}
			pr.Out.Body = io.NopCloser(bytes.NewReader(body))
			pr.Out.ContentLength = int64(len(body))
			NegotiateIdentity(pr.Out.Header)
			opts := Options{Family: FamilyOpenAI, Model: info.Model, StripUsageChunk: strip,
				OnDone: func(u Usage) { done <- u }}
			pr.Out = pr.Out.WithContext(withOptions(pr.Out.Context(), opts))
		},
		ModifyResponse: func(resp *http.Response) error {
			WrapResponse(resp, optionsFrom(resp.Request.Context()))
			return nil
		},
	}
	proxy := httptest.NewServer(rp)
	defer proxy.Close()

	req, _ := http.NewRequest("POST", proxy.URL+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}`))
	req.Header.Set("Accept-Encoding", "gzip")
	next <- struct{}{} // buffered: the upstream may send the first event
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if b := <-gotBody; !bytes.Contains(b, []byte(`"stream_options":{"include_usage":true}`)) {
		t.Fatalf("upstream got %s", b)
	}
	var got bytes.Buffer
	br := bufio.NewReader(resp.Body)
	for i, ev := range events {
		if isUsageOnlyEvent(ev) {
			next <- struct{}{}
			continue
		}
		// Each event must arrive whole before the upstream sends the next.
		buf := make([]byte, len(ev))
		if _, err := io.ReadFull(br, buf); err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		got.Write(buf)
		if i+1 < len(events) {
			next <- struct{}{}
		}
	}
	rest, _ := io.ReadAll(br)
	got.Write(rest)
	if want := readFixture(t, "openai_chat_stream.stripped.sse"); !bytes.Equal(got.Bytes(), want) {
		t.Fatalf("client got\n%q\nwant\n%q", tail(got.Bytes()), tail(want))
	}
	select {
	case u := <-done:
		if !u.Found || !u.Complete || u.InputTokens != 40000 || u.OutputTokens != 1500 || u.Model != "gpt-4o-mini-2024-07-18" {
			t.Fatalf("usage = %+v", u)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("OnDone not called")
	}
}

type optsKey struct{}

// withOptions carries a request's metering options from Rewrite to
// ModifyResponse, as a proxy would.
func withOptions(ctx context.Context, o Options) context.Context {
	return context.WithValue(ctx, optsKey{}, o)
}

func optionsFrom(ctx context.Context) Options {
	o, _ := ctx.Value(optsKey{}).(Options)
	return o
}
