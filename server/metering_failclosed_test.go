package server_test

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keypool/keypool/store"
)

// sendCT sends a raw body with a Content-Type and returns the response
// with its body read.
func (k *kp) sendCT(method, path, token, contentType, body string) (*http.Response, []byte) {
	k.t.Helper()
	req, err := http.NewRequest(method, k.url+path, strings.NewReader(body))
	if err != nil {
		k.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		k.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func multipartBody(t *testing.T, fields map[string]string, file bool) (string, string) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	if file {
		fw, err := mw.CreateFormFile("file", "a.wav")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = fw.Write([]byte("RIFF....WAVEfmt "))
	}
	for k, v := range fields {
		_ = mw.WriteField(k, v)
	}
	_ = mw.Close()
	return mw.FormDataContentType(), buf.String()
}

// TestModelsEnabledFailsClosed covers the ways a request could name a
// model past an allow-list: escaped JSON member names, repeated or
// non-string members, the query string, a Gemini path, a multipart or
// urlencoded form, and no model at all on an endpoint that takes one.
// None of the refused requests may reach the upstream.
func TestModelsEnabledFailsClosed(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t, fastUsage)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai", "models_enabled": []string{"gpt-4o-mini", "whisper-1"}})
	k.addService("gemini", up.URL, "bearer", map[string]any{"llm_family": "gemini"})
	k.addService("deepgram", up.URL, "bearer", nil)
	k.addService("search", up.URL, "bearer", nil)
	for _, s := range []string{"openai", "gemini", "deepgram", "search"} {
		k.addKey(s, "sk-"+s+"-failclosed-0123456789abcdef", nil)
	}
	team := k.addTeam("eng", map[string]any{"models_enabled": []string{"gpt-4o-mini", "whisper-1", "gemini-2.0-flash", "nova-3"}})
	tok := k.addToken(team, nil)

	const jsonCT = "application/json"
	mpWith := func(model string) (string, string) {
		return multipartBody(t, map[string]string{"model": model, "response_format": "json"}, true)
	}
	ctBad, mpBad := mpWith("gpt-4o")
	ctGood, mpGood := mpWith("whisper-1")
	ctNone, mpNone := multipartBody(t, map[string]string{"response_format": "json"}, true)
	ctFile, mpFile := multipartBody(t, map[string]string{"purpose": "batch"}, true)

	cases := []struct {
		name, method, path, ct, body string
		want                         int
		says                         string // in the refusal
	}{
		{"plain allowed", "POST", "/v1/openai/v1/chat/completions", jsonCT, `{"model":"gpt-4o-mini"}`, 200, ""},
		{"plain refused", "POST", "/v1/openai/v1/chat/completions", jsonCT, `{"model":"gpt-4o"}`, 403, `\"gpt-4o\"`},
		{"escaped key", "POST", "/v1/openai/v1/chat/completions", jsonCT, `{"mod\u0065l":"gpt-4o","messages":[]}`, 403, `\"gpt-4o\"`},
		{"escaped key allowed", "POST", "/v1/openai/v1/chat/completions", jsonCT, `{"\u006dodel":"gpt-4o-mini"}`, 200, ""},
		{"repeated key", "POST", "/v1/openai/v1/chat/completions", jsonCT, `{"model":"gpt-4o-mini","model":"gpt-4o"}`, 403, "must name an enabled model"},
		{"escaped repeat", "POST", "/v1/openai/v1/chat/completions", jsonCT, `{"model":"gpt-4o-mini","mod\u0065l":"gpt-4o"}`, 403, "must name an enabled model"},
		{"null model", "POST", "/v1/openai/v1/chat/completions", jsonCT, `{"model":null}`, 403, "must name an enabled model"},
		{"no model", "POST", "/v1/openai/v1/chat/completions", jsonCT, `{"messages":[]}`, 403, "must name an enabled model"},
		{"not json", "POST", "/v1/openai/v1/chat/completions", jsonCT, `{"model":"gpt-4o",`, 403, "must name an enabled model"},
		{"query model", "GET", "/v1/openai/v1/realtime?model=gpt-4o-realtime-preview", "", "", 403, `\"gpt-4o-realtime-preview\"`},
		{"query model allowed", "GET", "/v1/openai/v1/realtime?model=gpt-4o-mini", "", "", 200, ""},
		{"realtime without model", "GET", "/v1/openai/v1/realtime", "", "", 403, "must name an enabled model"},
		{"query semicolon", "GET", "/v1/openai/v1/realtime?x=1;model=gpt-4o", "", "", 403, "must name an enabled model"},
		{"query and body", "POST", "/v1/openai/v1/chat/completions?model=gpt-4o", jsonCT, `{"model":"gpt-4o-mini"}`, 403, `\"gpt-4o\"`},
		{"gemini path wins", "POST", "/v1/gemini/v1beta/models/gemini-2.5-pro:generateContent", jsonCT, `{"model":"gemini-2.0-flash","contents":[]}`, 403, `\"gemini-2.5-pro\"`},
		{"gemini path allowed", "POST", "/v1/gemini/v1beta/models/gemini-2.0-flash:generateContent", jsonCT, `{"contents":[]}`, 200, ""},
		{"gemini tuned model", "POST", "/v1/gemini/v1beta/tunedModels/mine:generateContent", jsonCT, `{"contents":[]}`, 403, "must name an enabled model"},
		{"multipart refused", "POST", "/v1/openai/v1/audio/transcriptions", ctBad, mpBad, 403, `\"gpt-4o\"`},
		{"multipart allowed", "POST", "/v1/openai/v1/audio/transcriptions", ctGood, mpGood, 200, ""},
		{"multipart without model", "POST", "/v1/openai/v1/audio/transcriptions", ctNone, mpNone, 403, "must name an enabled model"},
		{"urlencoded form", "POST", "/v1/openai/v1/completions", "application/x-www-form-urlencoded", "model=gpt-4o&prompt=hi", 403, `\"gpt-4o\"`},
		{"urlencoded second model", "POST", "/v1/openai/v1/completions", "application/x-www-form-urlencoded", "model=gpt-4o-mini&model_id=gpt-4o", 403, `\"gpt-4o\"`},
		{"urlencoded allowed", "POST", "/v1/openai/v1/completions", "application/x-www-form-urlencoded", "model=gpt-4o-mini&prompt=hi", 200, ""},
		{"urlencoded unreadable", "POST", "/v1/openai/v1/completions", "application/x-www-form-urlencoded", "model=gpt-4o-mini&prompt=%zz", 403, "form could not be read"},
		{"multipart truncated", "POST", "/v1/openai/v1/audio/transcriptions", ctGood, mpGood[:len(mpGood)-20], 403, "form could not be read"},
		{"multipart without boundary", "POST", "/v1/openai/v1/audio/transcriptions", "multipart/form-data", mpGood, 403, "form could not be read"},
		{"json under a form type", "POST", "/v1/openai/v1/chat/completions", "multipart/form-data; boundary=x", `{"model":"gpt-4o-mini"}`, 403, "form could not be read"},
		{"file upload", "POST", "/v1/openai/v1/files", ctFile, mpFile, 200, ""},
		{"batch", "POST", "/v1/openai/v1/batches", jsonCT, `{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}`, 200, ""},
		{"model listing", "GET", "/v1/openai/v1/models", "", "", 200, ""},
		{"deepgram query", "POST", "/v1/deepgram/v1/listen?model=nova-2", "audio/wav", "RIFF....", 403, `\"nova-2\"`},
		{"deepgram allowed", "POST", "/v1/deepgram/v1/listen?model=nova-3&smart_format=true", "audio/wav", "RIFF....", 200, ""},
		{"deepgram without model", "POST", "/v1/deepgram/v1/listen", "audio/wav", "RIFF....", 403, "must name an enabled model"},
		{"search takes no model", "POST", "/v1/search/search", jsonCT, `{"query":"keypool"}`, 200, ""},
	}
	for _, tc := range cases {
		n := len(up.seen())
		resp, b := k.sendCT(tc.method, tc.path, tok, tc.ct, tc.body)
		if resp.StatusCode != tc.want {
			t.Errorf("%s: %d %s, want %d", tc.name, resp.StatusCode, b, tc.want)
			continue
		}
		if tc.want == 403 {
			if !strings.Contains(string(b), `"forbidden"`) || !strings.Contains(string(b), tc.says) {
				t.Errorf("%s: %s, want forbidden saying %s", tc.name, b, tc.says)
			}
			if len(up.seen()) != n {
				t.Errorf("%s: a refused request reached the upstream", tc.name)
			}
		}
	}
	// The path model is what a Gemini request is priced and recorded as.
	k2 := startKP(t, fastUsage)
	k2.addService("gemini", up.URL, "bearer", map[string]any{"llm_family": "gemini"})
	k2.addKey("gemini", "sk-gemini-pricing-0123456789abcdef", nil)
	tok2 := k2.addToken(k2.addTeam("eng", nil), nil)
	if resp, b := k2.send("POST", "/v1/gemini/v1beta/models/gemini-2.5-pro:generateContent", tok2, `{"model":"gemini-2.0-flash","contents":[]}`); resp.StatusCode != 200 {
		t.Fatalf("gemini: %d %s", resp.StatusCode, b)
	}
	k2.waitUsage(1)
	rows, err := k2.srv.Store().QueryUsage(context.Background(), store.UsageQuery{GroupBy: []string{store.GroupModel}})
	if err != nil || len(rows) != 1 || rows[0].Group[store.GroupModel] != "gemini-2.5-pro" {
		t.Errorf("usage by model: %+v %v, want the path's model", rows, err)
	}
}

// TestStreamCutBeforeUsageIsCharged: a client that reads a stream up to
// its finish_reason chunk and hangs up before the usage chunk is charged
// the admission estimate, so a daily_token_limit still binds it.
func TestStreamCutBeforeUsageIsCharged(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, `data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":"hello"},"finish_reason":null}]}`+"\n\n")
		_, _ = io.WriteString(w, `data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}`+"\n\n")
		w.(http.Flusher).Flush()
		select { // the usage chunk comes after the client is gone
		case <-r.Context().Done():
			return
		case <-time.After(10 * time.Second):
		}
		_, _ = io.WriteString(w, `data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":2000,"completion_tokens":8000,"total_tokens":10000}}`+"\n\ndata: [DONE]\n\n")
	})
	k := startKP(t, fastUsage)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	keyID := k.addKey("openai", "sk-streamcut-0123456789abcdef", map[string]any{"balance_total": 1e9, "balance_unit": "tokens"})
	team := k.addTeam("eng", map[string]any{"daily_token_limit": 12000})
	tok := k.addToken(team, nil)
	body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":4000}`
	est := int64(len(body)+3)/4 + 4000

	hangUp := func() int {
		req, _ := http.NewRequest("POST", k.url+"/v1/openai/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(b), `"budget_exceeded"`) {
				t.Fatalf("%d %s", resp.StatusCode, b)
			}
			return resp.StatusCode
		}
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if strings.Contains(sc.Text(), `"finish_reason":"stop"`) {
				return 200 // hang up: the deferred Close
			}
		}
		t.Fatal("stream ended before its finish_reason chunk")
		return 0
	}
	admitted := 0
	for i := range 6 {
		if hangUp() != 200 {
			break
		}
		admitted++
		k.waitUsage(int64(i + 1))
	}
	// Each cut stream is charged its estimate (est ≈ 4025 tokens): a
	// stream is admitted while the day's usage is below 12000, so three
	// (0, 4025, 8050 used before each) and no fourth (12075).
	if want := int((12000 + est - 1) / est); admitted != want {
		t.Fatalf("admitted %d cut streams under a daily limit of 12000 at an estimate of %d each, want %d", admitted, est, want)
	}
	rows, err := k.srv.Store().QueryUsage(context.Background(), store.UsageQuery{})
	if err != nil || len(rows) != 1 || rows[0].TokensIn+rows[0].TokensOut != int64(admitted)*est {
		t.Errorf("usage records: %+v %v, want %d tokens", rows, err, int64(admitted)*est)
	}
	eventually(t, "key spend", func() bool {
		kr, err := k.srv.Store().GetKey(context.Background(), keyID)
		return err == nil && kr.BalanceUsed == float64(int64(admitted)*est)
	})

	// A client that goes away before the answer (499) after the request
	// went upstream is charged its estimate too.
	slow := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	k.addService("slow", slow.URL, "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("slow", "sk-slow-0123456789abcdef", nil)
	tok2 := k.addToken(k.addTeam("ops", nil), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", k.url+"/v1/slow/v1/chat/completions", strings.NewReader(`{"model":"gpt-4o-mini","max_tokens":100}`))
	req.Header.Set("Authorization", "Bearer "+tok2)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("slow upstream answered %d", resp.StatusCode)
	}
	k.waitUsage(int64(admitted) + 1)
	rows, _ = k.srv.Store().QueryUsage(context.Background(), store.UsageQuery{GroupBy: []string{store.GroupService}})
	for _, r := range rows {
		if r.Group[store.GroupService] == "slow" && r.TokensIn+r.TokensOut != int64(len(`{"model":"gpt-4o-mini","max_tokens":100}`)+3)/4+100 {
			t.Errorf("canceled request charged %+v", r)
		}
	}
}

// TestTotalBudgetRetryAfter: a refusal by a total limit (which never
// resets) still carries Retry-After, and says an admin must raise it.
func TestTotalBudgetRetryAfter(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t, fastUsage)
	k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": "openai"})
	k.addKey("openai", "sk-total-0123456789abcdef", nil)
	tok := k.addToken(k.addTeam("eng", map[string]any{"limit_tokens_total_block": 10}), nil)
	// The first request is admitted (nothing used yet) and spends 18.
	if resp, b := k.send("POST", "/v1/openai/v1/chat/completions", tok, `{"model":"gpt-4o-mini","max_tokens":100}`); resp.StatusCode != 200 {
		t.Fatalf("first request: %d %s", resp.StatusCode, b)
	}
	k.waitUsage(1)
	resp, b := k.send("POST", "/v1/openai/v1/chat/completions", tok, `{"model":"gpt-4o-mini","max_tokens":100}`)
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(b), `"budget_exceeded"`) {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	if ra := resp.Header.Get("Retry-After"); ra != "86400" {
		t.Errorf("Retry-After = %q, want 86400", ra)
	}
	if !strings.Contains(string(b), "until an admin raises or removes it") {
		t.Errorf("message: %s", b)
	}
}
