package route

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool/breaker"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

func targets(svcs ...string) []store.Target {
	out := make([]store.Target, len(svcs))
	for i, s := range svcs {
		out[i] = store.Target{Service: s}
	}
	return out
}

func TestTableMatchesExactBeforeGlobsInOrder(t *testing.T) {
	tb, err := Compile([]store.Route{
		{Model: "claude-*", Targets: targets("anthropic")},
		{Model: "claude-3-opus", Targets: targets("bedrock")},
		{Model: "*", Targets: targets("openrouter")},
		{Model: "meta-llama/*", Targets: targets("never")}, // after "*": never reached
	})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct{ model, want string }{
		{"claude-3-opus", "bedrock"},
		{"claude-sonnet-4-5", "anthropic"},
		{"gpt-4o", "openrouter"},
		{"meta-llama/Llama-3.3-70B", "openrouter"},
	}
	for _, c := range cases {
		t.Run(c.model, func(t *testing.T) {
			r := tb.lookup(c.model)
			if r == nil || r.targets[0].Service != c.want {
				t.Fatalf("lookup(%q) = %+v, want %s", c.model, r, c.want)
			}
		})
	}
	if got := tb.Models(); len(got) != 1 || got[0] != "claude-3-opus" {
		t.Errorf("Models() = %v, want the exact routes only", got)
	}
}

func TestGlobMatchesAcrossSlashes(t *testing.T) {
	tb, err := Compile([]store.Route{{Model: "meta-llama/*-Instruct", Targets: targets("together")}})
	if err != nil {
		t.Fatal(err)
	}
	for model, want := range map[string]bool{
		"meta-llama/Llama-3.3-70B-Instruct": true,
		"meta-llama/x/y-Instruct":           true,
		"meta-llama/Llama-3.3-70B":          false,
		"mistral/x-Instruct":                false,
	} {
		if got := tb.Routes(model); got != want {
			t.Errorf("Routes(%q) = %v, want %v", model, got, want)
		}
	}
}

func TestCompileRefusesRoutesThatCannotWork(t *testing.T) {
	cases := []struct {
		name   string
		routes []store.Route
		msg    string
	}{
		{"none", nil, "at least one route"},
		{"empty model", []store.Route{{Model: "", Targets: targets("a")}}, "non-empty"},
		{"twice", []store.Route{{Model: "x", Targets: targets("a")}, {Model: "x", Targets: targets("b")}}, "routed twice"},
		{"bad glob", []store.Route{{Model: "gpt-[4", Targets: targets("a")}}, "not a valid glob"},
		{"no targets", []store.Route{{Model: "x"}}, "targets must not be empty"},
		{"no service", []store.Route{{Model: "x", Targets: []store.Target{{}}}}, "service is required"},
		{"negative weight", []store.Route{{Model: "x", Targets: []store.Target{{Service: "a", Weight: -1}}}}, "weight"},
		{"relative path", []store.Route{{Model: "x", Targets: []store.Target{{Service: "a", Path: "v1"}}}}, "absolute path"},
		{"dot path", []store.Route{{Model: "x", Targets: []store.Target{{Service: "a", Path: "/v1/../admin"}}}}, "dot segment"},
		{"glob upstream model", []store.Route{{Model: "x", Targets: []store.Target{{Service: "a", Model: "gpt-*"}}}}, "plain model name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Compile(c.routes)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("err = %v, want ErrInvalid with %q", err, c.msg)
			}
		})
	}
}

func TestValidateChecksTargetServices(t *testing.T) {
	svcs := map[string]store.Service{"openai": {Name: "openai"}, "other": {Name: "other", Kind: store.KindRouter}}
	lookup := func(n string) (store.Service, bool) { s, ok := svcs[n]; return s, ok }
	cases := []struct {
		name, target, msg string
	}{
		{"unknown", "nope", `"nope" does not exist`},
		{"router", "other", `"other" is a router`},
		{"itself", "llm", "route to itself"},
		{"ok", "openai", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Validate("llm", []store.Route{{Model: "m", Targets: targets(c.target)}}, lookup)
			if c.msg == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("err = %v, want %q", err, c.msg)
			}
		})
	}
}

func TestFallsBackOnlyWhenTheTargetCouldNotServe(t *testing.T) {
	for status, want := range map[int]bool{
		200: false, 201: false, 101: false, 304: false,
		400: false, 404: false, 409: false, 413: false, 422: false,
		401: true, 403: true, 408: true, 429: true, 500: true, 502: true, 503: true, 504: true,
	} {
		if got := fallsBack(status); got != want {
			t.Errorf("fallsBack(%d) = %v, want %v", status, got, want)
		}
	}
}

// fakeNext is a stand-in for the proxy: it answers each service as
// scripted and records the attempts.
type fakeNext struct {
	mu       sync.Mutex
	status   map[string]int
	attempts []string // service + " " + path + " " + body
}

func (f *fakeNext) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a := AttemptFrom(r.Context())
	b, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	f.attempts = append(f.attempts, a.Service+" "+r.URL.Path+" "+string(b))
	st := f.status[a.Service]
	f.mu.Unlock()
	if st == 0 {
		st = 200
	}
	w.Header().Set("X-Keypool-Key-Id", a.Service+"-key")
	w.WriteHeader(st)
	fmt.Fprintf(w, `{"served_by":%q}`, a.Service)
}

func newTestHandler(next http.Handler, routes []store.Route, avail func(string) bool) *Handler {
	tb, err := Compile(routes)
	if err != nil {
		panic(err)
	}
	h := &Handler{
		Next:      next,
		Authorize: func(r *http.Request, _, _ string) (any, error) { return nil, nil },
		Available: avail,
	}
	h.SetRouters(map[string]*Table{"llm": tb})
	return h
}

func serve(h http.Handler, body string) *httptest.ResponseRecorder {
	req := httptest.NewRequest("POST", "/v1/llm/v1/chat/completions?x=1", strings.NewReader(body))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

func TestHandlerTriesTargetsInOrderUntilOneServes(t *testing.T) {
	routes := []store.Route{{Model: "smart", Targets: []store.Target{
		{Service: "a", Model: "a-model"}, {Service: "b", Path: "/v1beta/openai", Model: "b-model"}, {Service: "c"},
	}}}
	cases := []struct {
		name     string
		status   map[string]int
		want     int
		served   string
		attempts int
	}{
		{"first serves", nil, 200, "a", 1},
		{"503 then served", map[string]int{"a": 503}, 200, "b", 2},
		{"429 and 401 then served", map[string]int{"a": 429, "b": 401}, 200, "c", 3},
		{"400 returned at once", map[string]int{"a": 400}, 400, "a", 1},
		{"all fail: the last answer", map[string]int{"a": 503, "b": 503, "c": 502}, 502, "c", 3},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			next := &fakeNext{status: c.status}
			rec := serve(newTestHandler(next, routes, nil), `{"model":"smart","messages":[]}`)
			if rec.Code != c.want || rec.Header().Get(HeaderService) != c.served ||
				!strings.Contains(rec.Body.String(), `"served_by":"`+c.served+`"`) {
				t.Fatalf("%d %v %s, want %d from %s", rec.Code, rec.Header(), rec.Body, c.want, c.served)
			}
			if rec.Header().Get("X-Keypool-Key-Id") != c.served+"-key" {
				t.Errorf("key id %q: a dropped attempt's headers leaked", rec.Header().Get("X-Keypool-Key-Id"))
			}
			if len(next.attempts) != c.attempts {
				t.Fatalf("attempts %v, want %d", next.attempts, c.attempts)
			}
			want := []string{
				`a /v1/a/v1/chat/completions {"model":"a-model","messages":[]}`,
				`b /v1/b/v1beta/openai/chat/completions {"model":"b-model","messages":[]}`,
				`c /v1/c/v1/chat/completions {"model":"smart","messages":[]}`,
			}
			for i, got := range next.attempts {
				if got != want[i] {
					t.Errorf("attempt %d = %s, want %s", i, got, want[i])
				}
			}
		})
	}
}

func TestHandlerSkipsTargetsWithoutKeys(t *testing.T) {
	routes := []store.Route{{Model: "m", Targets: targets("a", "b")}}
	next := &fakeNext{}
	rec := serve(newTestHandler(next, routes, func(s string) bool { return s != "a" }), `{"model":"m"}`)
	if rec.Code != 200 || len(next.attempts) != 1 || rec.Header().Get(HeaderService) != "b" {
		t.Fatalf("%d %v attempts %v", rec.Code, rec.Header(), next.attempts)
	}
	// Nothing available: the first target answers (its 429 and
	// Retry-After reach the client).
	next = &fakeNext{status: map[string]int{"a": 429}}
	rec = serve(newTestHandler(next, routes, func(string) bool { return false }), `{"model":"m"}`)
	if rec.Code != 429 || len(next.attempts) != 1 || rec.Header().Get(HeaderService) != "a" {
		t.Fatalf("%d %v attempts %v", rec.Code, rec.Header(), next.attempts)
	}
}

func TestHandlerBreakerSkipsAFailingTargetUntilItsPeriodEnds(t *testing.T) {
	routes := []store.Route{{Model: "m", Targets: targets("a", "b")}}
	next := &fakeNext{status: map[string]int{"a": 503}}
	h := newTestHandler(next, routes, nil)
	now := time.Unix(1_000_000, 0)
	h.now = func() time.Time { return now }
	for range 3 { // 3 consecutive failures open a's breaker
		serve(h, `{"model":"m"}`)
	}
	next.attempts = nil
	for range 5 {
		if rec := serve(h, `{"model":"m"}`); rec.Code != 200 {
			t.Fatal(rec.Code)
		}
	}
	if len(next.attempts) != 5 {
		t.Fatalf("attempts %v: a was not skipped while its breaker is open", next.attempts)
	}
	now = now.Add(11 * time.Second)
	next.status["a"] = 0
	next.attempts = nil
	serve(h, `{"model":"m"}`)
	if len(next.attempts) != 1 || !strings.HasPrefix(next.attempts[0], "a ") {
		t.Fatalf("attempts %v: a not probed after its open period", next.attempts)
	}
}

func TestHandlerSpreadsByWeight(t *testing.T) {
	routes := []store.Route{{Model: "m", Targets: []store.Target{{Service: "a", Weight: 3}, {Service: "b", Weight: 1}}}}
	next := &fakeNext{}
	h := newTestHandler(next, routes, nil)
	n := map[string]int{}
	for range 4000 {
		n[serve(h, `{"model":"m"}`).Header().Get(HeaderService)]++
	}
	// 3:1 of 4000 is 3000; 5 standard deviations (≈27 each) either side.
	if n["a"] < 2860 || n["a"] > 3140 || n["a"]+n["b"] != 4000 {
		t.Fatalf("spread %v, want about 3000:1000", n)
	}
}

func TestHandlerRefusesRequestsItCannotRoute(t *testing.T) {
	routes := []store.Route{{Model: "m", Targets: targets("a")}}
	cases := []struct {
		name, path, body string
		status           int
		code             string
	}{
		{"no model", "/v1/llm/v1/chat/completions", `{"messages":[]}`, 400, httpx.CodeBadRequest},
		{"ambiguous model", "/v1/llm/v1/chat/completions", `{"model":"m","model":"n"}`, 400, httpx.CodeBadRequest},
		{"unrouted model", "/v1/llm/v1/chat/completions", `{"model":"x"}`, 404, httpx.CodeNotFound},
		{"not under /v1", "/v1/llm/chat/completions", `{"model":"m"}`, 404, httpx.CodeNotFound},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			next := &fakeNext{}
			h := newTestHandler(next, routes, nil)
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest("POST", c.path, strings.NewReader(c.body)))
			if rec.Code != c.status || !strings.Contains(rec.Body.String(), `"code":"`+c.code+`"`) || len(next.attempts) != 0 {
				t.Fatalf("%d %s attempts %v", rec.Code, rec.Body, next.attempts)
			}
		})
	}
}

// TestHeldWriterStreamsOnceCommitted: a committed answer is flushed
// through as it is written.
func TestHeldWriterStreamsOnceCommitted(t *testing.T) {
	rec := httptest.NewRecorder()
	hw := new(heldWriter)
	hw.reset(rec, []string{"a"}, false)
	hw.Header().Set("Content-Type", "text/event-stream")
	hw.WriteHeader(200)
	_, _ = hw.Write([]byte("data: 1\n\n"))
	if err := http.NewResponseController(hw).Flush(); err != nil || !rec.Flushed || rec.Body.String() != "data: 1\n\n" {
		t.Fatalf("flushed %v body %q err %v", rec.Flushed, rec.Body, err)
	}
	// A held failure writes nothing.
	rec = httptest.NewRecorder()
	hw = new(heldWriter)
	hw.reset(rec, []string{"a"}, false)
	hw.Header().Set("X-Keypool-Key-Id", "k1")
	hw.WriteHeader(503)
	_, _ = hw.Write([]byte("overloaded"))
	_ = http.NewResponseController(hw).Flush()
	if hw.committed || rec.Flushed || rec.Body.Len() != 0 || rec.Header().Get("X-Keypool-Key-Id") != "" {
		t.Fatalf("a held failure reached the client: %v %q", rec.Header(), rec.Body)
	}
}

func TestHandlerAppliesEachRoutersAttemptBudgetAndBreaker(t *testing.T) {
	routes := []store.Route{{Model: "m", Targets: targets("a", "b", "c")}}
	next := &fakeNext{status: map[string]int{"a": 503, "b": 503}}
	h := &Handler{Next: next, Authorize: func(r *http.Request, _, _ string) (any, error) { return nil, nil }}
	now := time.Unix(1_000_000, 0)
	h.now = func() time.Time { return now }
	tables := func(strict store.RouterSettings) map[string]*Table {
		one, err := CompileRouter(store.Service{Name: "strict", Routes: routes, Router: &strict})
		if err != nil {
			t.Fatal(err)
		}
		def, err := CompileRouter(store.Service{Name: "llm", Routes: routes})
		if err != nil {
			t.Fatal(err)
		}
		return map[string]*Table{"strict": one, "llm": def}
	}
	strict := store.RouterSettings{MaxAttempts: 1, BreakerFailures: 1, BreakerOpenSeconds: 60}
	h.SetRouters(tables(strict))
	at := func(router string) (int, []string) {
		t.Helper()
		next.attempts = nil
		req := httptest.NewRequest("POST", "/v1/"+router+"/v1/chat/completions", strings.NewReader(`{"model":"m"}`))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		var svcs []string
		for _, a := range next.attempts {
			svcs = append(svcs, strings.Fields(a)[0])
		}
		return rec.Code, svcs
	}
	// max_attempts 1: the client gets the first target's 503.
	if code, svcs := at("strict"); code != 503 || !slices.Equal(svcs, []string{"a"}) {
		t.Fatalf("strict router: %d after %v, want 503 after [a]", code, svcs)
	}
	// The default budget (3) falls back to c; a's breaker of this router
	// is still closed (one failure of 3).
	if code, svcs := at("llm"); code != 200 || !slices.Equal(svcs, []string{"a", "b", "c"}) {
		t.Fatalf("default router: %d after %v, want 200 after [a b c]", code, svcs)
	}
	// breaker_failures 1 opened a's breaker on the strict router: b is
	// tried first; on the other router a still is.
	if _, svcs := at("strict"); !slices.Equal(svcs, []string{"b"}) {
		t.Fatalf("strict router after a failed once: %v, want [b]", svcs)
	}
	if _, svcs := at("llm"); svcs[0] != "a" {
		t.Fatalf("default router: %v, want a first (its own breaker)", svcs)
	}
	// A reload with the same settings keeps the breakers' state.
	h.SetRouters(tables(strict))
	if _, svcs := at("strict"); svcs[0] == "a" || svcs[0] == "b" {
		t.Fatalf("after a reload: %v, want a and b still skipped", svcs)
	}
	// breaker_open_seconds 60: after 61 s, a is probed again.
	now = now.Add(61 * time.Second)
	next.status["a"] = 0
	if code, svcs := at("strict"); code != 200 || !slices.Equal(svcs, []string{"a"}) {
		t.Fatalf("after the open period: %d %v, want a probed", code, svcs)
	}
	// New settings start new breakers.
	next.status["a"] = 503
	at("strict") // opens a again
	h.SetRouters(tables(store.RouterSettings{MaxAttempts: 1, BreakerFailures: 2}))
	if _, svcs := at("strict"); !slices.Equal(svcs, []string{"a"}) {
		t.Fatalf("after new settings: %v, want a tried (a new breaker)", svcs)
	}
}

func TestRouterSettingsFillTheBreakerDefaults(t *testing.T) {
	h := &Handler{}
	cases := []struct {
		name string
		in   store.RouterSettings
		want breaker.Settings
	}{
		{"none", store.RouterSettings{}, DefaultBreaker},
		{"failures", store.RouterSettings{BreakerFailures: 7},
			breaker.Settings{ConsecutiveFailures: 7, OpenTimeout: 10 * time.Second, MaxOpenTimeout: 5 * time.Minute, HalfOpenMaxRequests: 1}},
		{"open above the default cap", store.RouterSettings{BreakerOpenSeconds: 600},
			breaker.Settings{ConsecutiveFailures: 3, OpenTimeout: 10 * time.Minute, MaxOpenTimeout: 10 * time.Minute, HalfOpenMaxRequests: 1}},
		{"both", store.RouterSettings{BreakerOpenSeconds: 5, BreakerMaxOpenSeconds: 20},
			breaker.Settings{ConsecutiveFailures: 3, OpenTimeout: 5 * time.Second, MaxOpenTimeout: 20 * time.Second, HalfOpenMaxRequests: 1}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := h.breakerSettings(c.in); got != c.want {
				t.Errorf("got %+v, want %+v", got, c.want)
			}
		})
	}
	if got := h.maxAttempts(&Table{settings: store.RouterSettings{MaxAttempts: 5}}); got != 5 {
		t.Errorf("maxAttempts = %d, want 5", got)
	}
	if got := h.maxAttempts(&Table{}); got != DefaultMaxAttempts {
		t.Errorf("maxAttempts = %d, want %d", got, DefaultMaxAttempts)
	}
}
