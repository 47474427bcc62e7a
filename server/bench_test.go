package server_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/server"
	"github.com/keypool/keypool/store"
)

// inProcessUpstream answers every request with a small OpenAI chat
// completion, without a network.
type inProcessUpstream struct{ body []byte }

func (u inProcessUpstream) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil {
		_, _ = io.Copy(io.Discard, r.Body)
		_ = r.Body.Close()
	}
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(u.body)))
	return &http.Response{StatusCode: 200, Header: h, Body: io.NopCloser(bytes.NewReader(u.body)),
		ContentLength: int64(len(u.body)), Request: r, ProtoMajor: 1, ProtoMinor: 1}, nil
}

// connRecorder is an httptest.ResponseRecorder whose connection takes
// read deadlines, as a server's connection does: keypoold bounds request
// body reads through http.ResponseController, and the bare recorder's
// ErrNotSupported answer would count allocations that serving never makes.
type connRecorder struct{ *httptest.ResponseRecorder }

func (connRecorder) SetReadDeadline(time.Time) error { return nil }

// BenchmarkProxyRequest sends a chat completion through the server's
// handler to an in-process upstream, with metering off (llm_family none)
// and on (llm_family openai, a team token budget and a service cost
// budget, a usd key balance) and through a router to the metered
// service, and reports allocations and process CPU time per request;
// "harness" is the benchmark's own share of them (request, recorder,
// upstream stand-in), to subtract. The server's figures include the usage
// records its background writer inserts.
func BenchmarkProxyRequest(b *testing.B) {
	dir := b.TempDir()
	ctx := context.Background()
	chat := []byte(`{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}`)
	srv, err := server.New(ctx, server.Config{
		Database:      server.SecretURL("sqlite:" + filepath.Join(dir, "keypool.db")),
		AdminToken:    "kpadm_bench_admin_token_0123456789abcdef",
		EncryptionKey: testEncKey,
		LogOutput:     io.Discard,
		LogLevel:      "error",
		Output:        io.Discard,
		Upstream:      inProcessUpstream{chat},
		// Nothing on a clock: usage is written in batches of 1000 (as
		// under load) and at shutdown, the store and the journal are not
		// polled or synced on a timer, so that an instruction count
		// (bench/callgrind.sh, under valgrind's slow clock) depends on
		// the requests alone.
		SyncInterval: server.Duration(time.Hour),
		Usage:        store.UsageWriterOptions{Interval: time.Hour},
		UsageJournal: server.JournalConfig{SyncInterval: server.Duration(time.Hour)},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Shutdown(ctx)
	st := srv.Store()
	for _, sv := range []store.Service{
		{Name: "plain", BaseURL: "http://upstream.test", AuthScheme: "bearer", LLMFamily: "none"},
		{Name: "llm", BaseURL: "http://upstream.test", AuthScheme: "bearer", LLMFamily: "openai",
			Limits: store.Limits{LimitCostDayWarn: 1e6, LimitCostDayBlock: 2e6}},
	} {
		if err := st.CreateService(ctx, &sv); err != nil {
			b.Fatal(err)
		}
		if err := st.CreateKeys(ctx, []*store.Key{{Service: sv.Name, Secret: keypool.Secret("sk-" + sv.Name + "-0123456789abcdef"),
			Status: store.StatusActive, BalanceTotal: 1e12, BalanceUnit: "usd"}}); err != nil {
			b.Fatal(err)
		}
	}
	if err := st.CreateService(ctx, &store.Service{Name: "router", Kind: store.KindRouter, AuthScheme: "bearer",
		Routes: []store.Route{{Model: "gpt-4o-mini", Targets: []store.Target{{Service: "llm"}}}}}); err != nil {
		b.Fatal(err)
	}
	team := &store.Team{Name: "bench", Limits: store.Limits{DailyTokenLimit: 1e15, TPMLimit: 1e15}}
	if err := st.CreateTeam(ctx, team); err != nil {
		b.Fatal(err)
	}
	tok, prefix, hash, err := auth.NewToken()
	if err != nil {
		b.Fatal(err)
	}
	if err := st.CreateToken(ctx, &store.Token{Name: "bench", TeamID: team.ID, Prefix: prefix, Hash: hash, IsActive: true}); err != nil {
		b.Fatal(err)
	}
	if err := srv.Reload(ctx); err != nil {
		b.Fatal(err)
	}
	h := srv.Handler()
	body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}`
	do := func(svc string) *httptest.ResponseRecorder {
		req := httptest.NewRequest("POST", "/v1/"+svc+"/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/json")
		w := httptest.NewRecorder()
		h.ServeHTTP(connRecorder{w}, req)
		return w
	}
	// harness is the benchmark's own share, to subtract: the request and
	// recorder it builds and the upstream stand-in's answer, without the
	// server.
	up := inProcessUpstream{chat}
	b.Run("harness", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				req := httptest.NewRequest("POST", "/v1/plain/v1/chat/completions", strings.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+tok)
				req.Header.Set("Content-Type", "application/json")
				w := connRecorder{httptest.NewRecorder()}
				resp, _ := up.RoundTrip(req)
				for k, v := range resp.Header {
					w.Header()[k] = v
				}
				w.WriteHeader(resp.StatusCode)
				_, _ = io.Copy(w, resp.Body)
			}
		})
	})
	for _, svc := range []string{"plain", "llm", "router"} {
		name := map[string]string{"plain": "meter=off", "llm": "meter=on", "router": "router"}[svc]
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			cpu0 := processCPU()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if w := do(svc); w.Code != 200 {
						b.Errorf("status %d: %s", w.Code, w.Body)
						return
					}
				}
			})
			// CPU per request, background work (usage writes) included:
			// steadier than ns/op on a shared machine.
			b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
		})
	}
}
