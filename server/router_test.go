package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
)

// provider is an OpenAI-compatible stand-in: OpenAI itself (bearer,
// /v1/chat/completions), Anthropic's compatibility endpoint (x-api-key,
// /v1/chat/completions) or Gemini's (x-goog-api-key,
// /v1beta/openai/chat/completions). It answers with the model the
// request named, streams when asked (with the usage chunk when
// stream_options.include_usage is set), and fails as mode says: "" serves,
// "429" rate-limits every key, "503" fails, "400" refuses the request.
type provider struct {
	*upstream
	name string
	mode atomic.Value // string
}

func newProvider(t *testing.T, name, path string, key func(*http.Request) string, want string) *provider {
	t.Helper()
	p := &provider{name: name}
	p.mode.Store("")
	p.upstream = newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != path+"/chat/completions" {
			w.WriteHeader(404)
			_, _ = io.WriteString(w, `{"error":{"message":"no such path `+r.URL.Path+`"}}`)
			return
		}
		if !strings.HasPrefix(key(r), want) {
			w.WriteHeader(401)
			_, _ = io.WriteString(w, `{"error":{"message":"bad key","type":"authentication_error"}}`)
			return
		}
		switch p.mode.Load().(string) {
		case "429":
			w.Header().Set("Retry-After", "60")
			w.WriteHeader(429)
			_, _ = io.WriteString(w, `{"error":{"message":"rate limited","type":"rate_limit_error"}}`)
			return
		case "503":
			w.WriteHeader(503)
			_, _ = io.WriteString(w, `{"error":{"message":"overloaded","type":"overloaded_error"}}`)
			return
		case "400":
			w.WriteHeader(400)
			_, _ = io.WriteString(w, `{"error":{"message":"messages: field required","type":"invalid_request_error"}}`)
			return
		}
		var req struct {
			Model         string `json:"model"`
			Stream        bool   `json:"stream"`
			StreamOptions struct {
				IncludeUsage bool `json:"include_usage"`
			} `json:"stream_options"`
		}
		_ = json.NewDecoder(r.Body).Decode(&req)
		if req.Stream {
			w.Header().Set("Content-Type", "text/event-stream")
			for _, tok := range []string{"from ", name} {
				fmt.Fprintf(w, "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":%q,\"choices\":[{\"index\":0,\"delta\":{\"content\":%q}}]}\n\n", req.Model, tok)
				w.(http.Flusher).Flush()
			}
			if req.StreamOptions.IncludeUsage {
				fmt.Fprintf(w, "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":%q,\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n", req.Model)
			}
			_, _ = io.WriteString(w, "data: [DONE]\n\n")
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":%q,"choices":[{"index":0,"message":{"role":"assistant","content":"from %s"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}`, req.Model, name)
	})
	return p
}

// hits counts the requests the provider received.
func (p *provider) hits() int { return len(p.seen()) }

// routerFixture is keypoold with three providers, each with two keys,
// and a router "llm" in front of them.
type routerFixture struct {
	k                         *kp
	openai, anthropic, gemini *provider
	token                     string
	client                    openai.Client
}

// llmRoutes are the routes of the fixture's router.
var llmRoutes = []map[string]any{
	{"model": "gpt-4o-mini", "targets": []map[string]any{{"service": "openai"}}},
	{"model": "claude-*", "targets": []map[string]any{{"service": "anthropic"}}},
	{"model": "fast", "targets": []map[string]any{{"service": "gemini", "path": "/v1beta/openai", "model": "gemini-2.0-flash"}}},
	{"model": "smart", "targets": []map[string]any{
		{"service": "openai", "model": "gpt-4o"},
		{"service": "anthropic", "model": "claude-sonnet-4-5"},
		{"service": "gemini", "path": "/v1beta/openai", "model": "gemini-2.5-pro"},
	}},
}

func newRouterFixture(t *testing.T, routerExtra, tokenExtra map[string]any) *routerFixture {
	t.Helper()
	f := &routerFixture{
		openai:    newProvider(t, "openai", "/v1", func(r *http.Request) string { return bearerKey(r.Header) }, "sk-oa-"),
		anthropic: newProvider(t, "anthropic", "/v1", func(r *http.Request) string { return r.Header.Get("X-Api-Key") }, "sk-ant-"),
		gemini:    newProvider(t, "gemini", "/v1beta/openai", func(r *http.Request) string { return r.Header.Get("X-Goog-Api-Key") }, "AIza-"),
	}
	k := startKP(t)
	f.k = k
	// Their families as for direct calls: routed requests are metered as
	// the OpenAI API they speak.
	k.addService("openai", f.openai.URL, "bearer", nil)
	k.addService("anthropic", f.anthropic.URL, "x-api-key", map[string]any{"llm_family": "anthropic"})
	k.addService("gemini", f.gemini.URL, "header:x-goog-api-key", map[string]any{"llm_family": "gemini"})
	for _, kv := range []struct{ svc, prefix string }{{"openai", "sk-oa-"}, {"anthropic", "sk-ant-"}, {"gemini", "AIza-"}} {
		for i := range 2 {
			k.addKey(kv.svc, fmt.Sprintf("%skey%d-0123456789abcdef", kv.prefix, i), nil)
		}
	}
	body := map[string]any{"name": "llm", "kind": "router", "routes": llmRoutes}
	for n, v := range routerExtra {
		body[n] = v
	}
	k.mustAdmin("POST", "/admin/services", body, http.StatusCreated)
	team := k.addTeam("apps", nil)
	f.token = k.addToken(team, tokenExtra)
	f.client = openai.NewClient(option.WithBaseURL(k.url+"/v1/llm/v1/"), option.WithAPIKey(f.token), option.WithMaxRetries(0))
	return f
}

// chat calls the router through the SDK and returns the answer's text
// and the service that served it.
func (f *routerFixture) chat(ctx context.Context, model string) (string, string, error) {
	var resp *http.Response
	cc, err := f.client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:    model,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hello")},
	}, option.WithResponseInto(&resp))
	if err != nil {
		return "", "", err
	}
	return cc.Choices[0].Message.Content, resp.Header.Get("X-Keypool-Service"), nil
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestRouterRoutesByExactGlobAndAlias: one base URL reaches the three
// providers; each upstream gets its own key scheme, its own path and the
// model the route names.
func TestRouterRoutesByExactGlobAndAlias(t *testing.T) {
	f := newRouterFixture(t, nil, nil)
	ctx := testCtx(t)
	cases := []struct {
		model, service, upstreamModel, path string
		p                                   *provider
	}{
		{"gpt-4o-mini", "openai", "gpt-4o-mini", "/v1/chat/completions", f.openai},
		{"claude-3-5-haiku-latest", "anthropic", "claude-3-5-haiku-latest", "/v1/chat/completions", f.anthropic},
		{"fast", "gemini", "gemini-2.0-flash", "/v1beta/openai/chat/completions", f.gemini},
		{"smart", "openai", "gpt-4o", "/v1/chat/completions", f.openai},
	}
	for _, c := range cases {
		t.Run(c.model, func(t *testing.T) {
			text, svc, err := f.chat(ctx, c.model)
			if err != nil {
				t.Fatal(err)
			}
			if svc != c.service || text != "from "+c.service {
				t.Errorf("served by %q (%q), want %q", svc, text, c.service)
			}
			last := c.p.last()
			if last.Path != c.path {
				t.Errorf("upstream path %q, want %q", last.Path, c.path)
			}
			if !strings.Contains(last.Body, `"model":"`+c.upstreamModel+`"`) {
				t.Errorf("upstream body %s, want model %q", last.Body, c.upstreamModel)
			}
			if strings.Contains(fmt.Sprint(last.Header), f.token) {
				t.Error("the team token reached the upstream")
			}
		})
	}
	code, m, _ := f.k.do("POST", "/v1/llm/v1/chat/completions", f.token, map[string]any{"model": "mistral-large"})
	if code != 404 || !strings.Contains(fmt.Sprint(m), "no route for model") {
		t.Errorf("unrouted model: %d %v", code, m)
	}
	code, m, _ = f.k.do("POST", "/v1/llm/v1/chat/completions", "kp_wrong", map[string]any{"model": "mistral-large"})
	if code != 401 {
		t.Errorf("bad token: %d %v", code, m)
	}
	f.k.checkLogs()
	if logs := f.k.logs.String(); !strings.Contains(logs, `"router":"llm"`) || !strings.Contains(logs, `"model":"gemini-2.0-flash"`) {
		t.Error("the access log does not name the router and the upstream model")
	}
}

// TestRouterFallsBackWhenKeysCooling: every OpenAI key answers 429; 200
// parallel requests for "smart" all succeed on Anthropic, and once the
// OpenAI keys are cooling, requests skip OpenAI without reaching it.
func TestRouterFallsBackWhenKeysCooling(t *testing.T) {
	f := newRouterFixture(t, nil, nil)
	f.openai.mode.Store("429")
	ctx := testCtx(t)
	var wg sync.WaitGroup
	var failed, byAnthropic atomic.Int64
	for range 200 {
		wg.Go(func() {
			_, svc, err := f.chat(ctx, "smart")
			switch {
			case err != nil:
				failed.Add(1)
				t.Log(err)
			case svc == "anthropic":
				byAnthropic.Add(1)
			}
		})
	}
	wg.Wait()
	if failed.Load() != 0 || byAnthropic.Load() != 200 {
		t.Fatalf("%d client failures, %d served by anthropic; want 0 and 200", failed.Load(), byAnthropic.Load())
	}
	before := f.openai.hits()
	for range 20 {
		if _, svc, err := f.chat(ctx, "smart"); err != nil || svc != "anthropic" {
			t.Fatalf("served by %q: %v", svc, err)
		}
	}
	if after := f.openai.hits(); after != before {
		t.Errorf("openai reached %d more times while its keys cool; want 0 (skipped)", after-before)
	}
	// Exact routes with one target answer what the pool answers.
	code, m, resp := f.k.do("POST", "/v1/llm/v1/chat/completions", f.token, map[string]any{"model": "gpt-4o-mini"})
	if code != 429 || resp.Header.Get("Retry-After") == "" || !strings.Contains(fmt.Sprint(m), "no_key_available") {
		t.Errorf("only target cooling: %d %v", code, m)
	}
}

// TestRouterFallbackByStatus: a 503 moves on to the next target, a 400
// the request caused goes to the client at once.
func TestRouterFallbackByStatus(t *testing.T) {
	f := newRouterFixture(t, nil, nil)
	ctx := testCtx(t)
	f.openai.mode.Store("503")
	text, svc, err := f.chat(ctx, "smart")
	if err != nil || svc != "anthropic" || text != "from anthropic" {
		t.Fatalf("503: served by %q (%q): %v", svc, text, err)
	}

	f.openai.mode.Store("400")
	before := f.anthropic.hits()
	_, _, err = f.chat(ctx, "smart")
	var apiErr *openai.Error
	if !errorsAs(err, &apiErr) || apiErr.StatusCode != 400 || !strings.Contains(apiErr.Error(), "field required") {
		t.Fatalf("400: %v", err)
	}
	if f.anthropic.hits() != before {
		t.Error("a 400 was retried on another service")
	}

	// Every target failing: the last answer reaches the client.
	for _, p := range []*provider{f.openai, f.anthropic, f.gemini} {
		p.mode.Store("503")
	}
	if _, _, err := f.chat(ctx, "smart"); !errorsAs(err, &apiErr) || apiErr.StatusCode != 503 {
		t.Fatalf("all failing: %v", err)
	}
}

func errorsAs(err error, target **openai.Error) bool {
	e, ok := err.(*openai.Error)
	if ok {
		*target = e
	}
	return ok
}

// TestRouterStreamsThroughFallback: a stream whose first target fails
// comes from the second, with its usage metered and charged to it.
func TestRouterStreamsThroughFallback(t *testing.T) {
	f := newRouterFixture(t, nil, nil)
	f.openai.mode.Store("503")
	ctx := testCtx(t)
	var resp *http.Response
	stream := f.client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
		Model:    "smart",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("stream")},
	}, option.WithResponseInto(&resp))
	var text strings.Builder
	for stream.Next() {
		ch := stream.Current()
		if len(ch.Choices) > 0 {
			text.WriteString(ch.Choices[0].Delta.Content)
		}
		if ch.Usage.TotalTokens != 0 {
			t.Error("the usage chunk keypool asked for reached a client that did not ask")
		}
	}
	if err := stream.Err(); err != nil || text.String() != "from anthropic" {
		t.Fatalf("stream %q: %v", text.String(), err)
	}
	if resp.Header.Get("X-Keypool-Service") != "anthropic" || resp.Header.Get("X-Keypool-Key-Id") == "" {
		t.Errorf("headers %v", resp.Header)
	}
	if !strings.Contains(f.anthropic.last().Body, `"include_usage":true`) {
		t.Error("the stream was not asked for its usage")
	}
	// The usage records name the router and the target that served.
	eventually(t, "usage records", func() bool {
		m := f.k.mustAdmin("GET", "/admin/usage?group_by=router,service,model", nil, http.StatusOK)
		got := map[string]float64{}
		for _, r := range m["rows"].([]any) {
			row := r.(map[string]any)
			got[fmt.Sprint(row["router"], "/", row["service"], "/", row["model"])] += row["tokens_in"].(float64) + row["tokens_out"].(float64)
		}
		return got["llm/anthropic/claude-sonnet-4-5"] == 7 && got["llm/openai/gpt-4o"] == 0
	})
}

// TestRouterBudgetsPerTarget: a target whose budget is spent is skipped
// for the next one, and the router's own budget refuses once spent.
func TestRouterBudgetsPerTarget(t *testing.T) {
	f := newRouterFixture(t, map[string]any{"limit_tokens_day_block": 60}, nil)
	f.k.mustAdmin("PATCH", "/admin/services/openai", map[string]any{"limit_tokens_day_block": 10}, http.StatusOK)
	ctx := testCtx(t)
	// The first request is admitted on openai (nothing used yet) and
	// spends 18 tokens there; the next ones are refused by openai's
	// budget and served by anthropic.
	want := []string{"openai", "anthropic", "anthropic"}
	for i, w := range want {
		_, svc, err := f.chat(ctx, "smart")
		if err != nil || svc != w {
			t.Fatalf("request %d: served by %q, want %q: %v", i, svc, w, err)
		}
	}
	// 54 tokens used through the router: the fourth is admitted (54 <
	// 60), the fifth refused by the router's budget.
	if _, _, err := f.chat(ctx, "smart"); err != nil {
		t.Fatal(err)
	}
	_, _, err := f.chat(ctx, "smart")
	var apiErr *openai.Error
	if !errorsAs(err, &apiErr) || apiErr.StatusCode != 429 || !strings.Contains(apiErr.Error(), "budget exceeded: router") {
		t.Fatalf("router budget: %v", err)
	}
}

// TestRouterModelsAndAllowLists: the caller's models_enabled names the
// client-facing model (an alias included); /models lists only what the
// router's and the caller's lists allow; a target's own list applies to
// the upstream model.
func TestRouterModelsAndAllowLists(t *testing.T) {
	f := newRouterFixture(t, map[string]any{"models_enabled": []string{"gpt-4o-mini", "fast", "smart"}},
		map[string]any{"models_enabled": []string{"fast", "smart", "claude-3-5-haiku-latest"}})
	ctx := testCtx(t)
	page, err := f.client.Models.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, m := range page.Data {
		ids = append(ids, m.ID)
	}
	if strings.Join(ids, ",") != "fast,smart" {
		t.Errorf("models %v, want [fast smart]", ids)
	}
	if _, svc, err := f.chat(ctx, "fast"); err != nil || svc != "gemini" {
		t.Errorf("alias on the token's list: %q %v", svc, err)
	}
	for _, m := range []string{"gpt-4o-mini", "claude-3-5-haiku-latest"} {
		var apiErr *openai.Error
		if _, _, err := f.chat(ctx, m); !errorsAs(err, &apiErr) || apiErr.StatusCode != 403 {
			t.Errorf("%s: %v, want 403", m, err)
		}
	}
	// openai allows only gpt-4o-mini: "smart" skips it for anthropic.
	f.k.mustAdmin("PATCH", "/admin/services/openai", map[string]any{"models_enabled": []string{"gpt-4o-mini"}}, http.StatusOK)
	before := f.openai.hits()
	if _, svc, err := f.chat(ctx, "smart"); err != nil || svc != "anthropic" {
		t.Errorf("target allow-list: %q %v", svc, err)
	}
	if f.openai.hits() != before {
		t.Error("a model off the target's list reached it")
	}
}

// TestRouterValidation: the admin API refuses routes that cannot work.
func TestRouterValidation(t *testing.T) {
	f := newRouterFixture(t, nil, nil)
	cases := []struct {
		name   string
		body   map[string]any
		status int
		msg    string
	}{
		{"unknown service", map[string]any{"routes": []map[string]any{{"model": "x", "targets": []map[string]any{{"service": "nope"}}}}}, 400, `service "nope" does not exist`},
		{"router target", map[string]any{"routes": []map[string]any{{"model": "x", "targets": []map[string]any{{"service": "llm"}}}}}, 400, `"llm" is a router`},
		{"empty targets", map[string]any{"routes": []map[string]any{{"model": "x", "targets": []map[string]any{}}}}, 400, "targets must not be empty"},
		{"bad glob", map[string]any{"routes": []map[string]any{{"model": "gpt-[4", "targets": []map[string]any{{"service": "openai"}}}}}, 400, "not a valid glob"},
		{"no routes", map[string]any{}, 400, "at least one route"},
		{"base_url", map[string]any{"base_url": "https://api.openai.com", "routes": llmRoutes}, 400, "no base_url"},
		{"bad kind", map[string]any{"kind": "proxy", "routes": llmRoutes}, 400, "kind"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			body := map[string]any{"name": "r2", "kind": "router"}
			for n, v := range c.body {
				body[n] = v
			}
			code, m, _ := f.k.do("POST", "/admin/services", f.k.admin, body)
			if code != c.status || !strings.Contains(fmt.Sprint(m), c.msg) {
				t.Errorf("%d %v, want %d with %q", code, m, c.status, c.msg)
			}
		})
	}
	code, m, _ := f.k.do("DELETE", "/admin/services/gemini", f.k.admin, nil)
	if code != 409 || !strings.Contains(fmt.Sprint(m), `router "llm"`) {
		t.Errorf("deleting a target: %d %v", code, m)
	}
	code, m, _ = f.k.do("POST", "/admin/keys", f.k.admin, map[string]any{"service": "llm", "key_value": "sk-x-0123456789"})
	if code != 400 {
		t.Errorf("a key on a router: %d %v", code, m)
	}
	got := f.k.mustAdmin("GET", "/admin/services/llm", nil, http.StatusOK)
	if got["kind"] != "router" || len(got["routes"].([]any)) != len(llmRoutes) {
		t.Errorf("GET router: %v", got)
	}
	f.k.mustAdmin("PATCH", "/admin/services/llm", map[string]any{"routes": []map[string]any{{"model": "gpt-*", "targets": []map[string]any{{"service": "openai"}}}}}, http.StatusOK)
	if _, svc, err := f.chat(testCtx(t), "gpt-4.1"); err != nil || svc != "openai" {
		t.Errorf("after PATCH: %q %v", svc, err)
	}
}

// TestRouterSettings: a router's own attempt budget and breaker settings
// (the "router" object) are validated, shown, and applied.
func TestRouterSettings(t *testing.T) {
	f := newRouterFixture(t, nil, nil)
	for _, c := range []struct {
		name     string
		svc      map[string]any
		settings any
		msg      string
	}{
		{"out of range", map[string]any{"kind": "router", "routes": llmRoutes}, map[string]any{"max_attempts": 17}, "router.max_attempts must be between 1 and 16"},
		{"negative", map[string]any{"kind": "router", "routes": llmRoutes}, map[string]any{"breaker_failures": -1}, "router.breaker_failures"},
		{"cap below the period", map[string]any{"kind": "router", "routes": llmRoutes},
			map[string]any{"breaker_open_seconds": 60, "breaker_max_open_seconds": 30}, "must not be less than router.breaker_open_seconds"},
		{"unknown field", map[string]any{"kind": "router", "routes": llmRoutes}, map[string]any{"max_atempts": 2}, `unknown field "max_atempts"`},
		{"not an object", map[string]any{"kind": "router", "routes": llmRoutes}, 2, "router must be an object"},
		{"not a router", map[string]any{"base_url": "https://api.openai.com"}, map[string]any{"max_attempts": 2}, `router settings are for services of kind "router"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			body := map[string]any{"name": "r2", "router": c.settings}
			for n, v := range c.svc {
				body[n] = v
			}
			code, m, _ := f.k.do("POST", "/admin/services", f.k.admin, body)
			if code != 400 || !strings.Contains(fmt.Sprint(m), c.msg) {
				t.Errorf("%d %v, want 400 with %q", code, m, c.msg)
			}
		})
	}

	// Default budget: smart falls back from openai's 503 to anthropic.
	ctx := testCtx(t)
	f.openai.mode.Store("503")
	if _, svc, err := f.chat(ctx, "smart"); err != nil || svc != "anthropic" {
		t.Fatalf("default settings: served by %q: %v", svc, err)
	}
	got := f.k.mustAdmin("PATCH", "/admin/services/llm", map[string]any{"router": map[string]any{"max_attempts": 1}}, http.StatusOK)
	if rs, _ := got["router"].(map[string]any); rs["max_attempts"] != float64(1) {
		t.Fatalf("PATCH router settings: %v", got["router"])
	}
	if got := f.k.mustAdmin("GET", "/admin/services/llm", nil, http.StatusOK); fmt.Sprint(got["router"]) != "map[max_attempts:1]" {
		t.Fatalf("GET router settings: %v", got["router"])
	}
	before := f.anthropic.hits()
	var apiErr *openai.Error
	if _, _, err := f.chat(ctx, "smart"); !errorsAs(err, &apiErr) || apiErr.StatusCode != 503 {
		t.Fatalf("max_attempts 1: %v, want openai's 503", err)
	}
	if f.anthropic.hits() != before {
		t.Error("max_attempts 1 tried a second target")
	}
	// null restores the defaults.
	got = f.k.mustAdmin("PATCH", "/admin/services/llm", map[string]any{"router": nil}, http.StatusOK)
	if _, ok := got["router"]; ok {
		t.Fatalf("router settings after null: %v", got["router"])
	}
	if _, svc, err := f.chat(ctx, "smart"); err != nil || svc != "anthropic" {
		t.Fatalf("defaults restored: served by %q: %v", svc, err)
	}
}
