package proxy

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/keypool/keypool"
)

// fakeBase answers every request 200 with a short body, in process.
type fakeBase struct{}

func (fakeBase) RoundTrip(r *http.Request) (*http.Response, error) {
	return &http.Response{
		StatusCode: 200, Header: http.Header{"Content-Type": {"application/json"}},
		Body: io.NopCloser(strings.NewReader(`{"ok":true}`)), ContentLength: 11, Request: r,
	}, nil
}

func benchPool(b *testing.B, n int) *keypool.Pool {
	b.Helper()
	p, err := keypool.New(keypool.Config{})
	if err != nil {
		b.Fatal(err)
	}
	keys := make([]keypool.Key, n)
	for i := range keys {
		keys[i] = keypool.Key{ID: fmt.Sprintf("k%d", i), Secret: keypool.Secret(fmt.Sprintf("sk-bench-%032d", i))}
	}
	if err := p.SetService(keypool.Service{Name: "svc", BaseURL: "https://api.example.com"}, keys); err != nil {
		b.Fatal(err)
	}
	return p
}

// BenchmarkTransport measures RoundTrip (acquire, clone, inject, classify,
// wrap, read, close, release) over an in-process Base; "base-only" is the
// fake Base alone, to subtract.
func BenchmarkTransport(b *testing.B) {
	pool := benchPool(b, 10)
	req, _ := http.NewRequest("GET", "https://api.example.com/v1/models", nil)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("OpenAI-Beta", "assistants=v2")
	run := func(b *testing.B, rt http.RoundTripper) {
		b.ReportAllocs()
		buf := make([]byte, 64)
		for b.Loop() {
			resp, err := rt.RoundTrip(req)
			if err != nil {
				b.Fatal(err)
			}
			for {
				if _, err := resp.Body.Read(buf); err != nil {
					break
				}
			}
			resp.Body.Close()
		}
	}
	b.Run("base-only", func(b *testing.B) { run(b, fakeBase{}) })
	b.Run("serial", func(b *testing.B) { run(b, &Transport{Pool: pool, Service: "svc", Base: fakeBase{}}) })
	b.Run("parallel", func(b *testing.B) {
		tr := &Transport{Pool: pool, Service: "svc", Base: fakeBase{}}
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			buf := make([]byte, 64)
			for pb.Next() {
				resp, err := tr.RoundTrip(req)
				if err != nil {
					b.Error(err)
					return
				}
				for {
					if _, err := resp.Body.Read(buf); err != nil {
						break
					}
				}
				resp.Body.Close()
			}
		})
	})
}
