package server_test

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	_ "github.com/mattn/go-sqlite3" // the usage records, read back

	"github.com/keypool/keypool/internal/testutil"
	"github.com/keypool/keypool/server"
)

// A key with every character an encoding treats specially, and a basic-auth
// key user:password.
const (
	echoKey  = `sk-e2e-A&b<c>d"e\f/g+h=i~j%k;m0123456789`
	basicKey = "acct_0123456789:sk-e2e-basic-secret-0123456789"
)

// TestScrubEveryEncodingEndToEnd is issue 16 item 3 through keypoold: an
// upstream echoes the key it got and the team token in every spelling, in
// headers and bodies of every status, streamed and not; no spelling of
// either reaches the client, the logs or the usage records.
func TestScrubEveryEncodingEndToEnd(t *testing.T) {
	var tok string
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		key := map[string]string{"/bearer": echoKey, "/basic": basicKey}[strings.TrimSuffix(strings.TrimSuffix(r.URL.Path, "/stream"), "/fixed")]
		status := 200
		fmt.Sscanf(r.URL.Query().Get("status"), "%d", &status)
		w.Header().Set("Www-Authenticate", "echo "+r.Header.Get("Authorization"))
		for n, v := range testutil.Spellings(key) {
			w.Header().Add("X-Echo", n+"="+v)
		}
		for n, v := range testutil.Spellings(tok) {
			w.Header().Add("X-Echo-Token", n+"="+v)
		}
		body := "auth=" + r.Header.Get("Authorization") + "\n" + testutil.EchoAll(key, tok)
		if strings.HasSuffix(r.URL.Path, "/fixed") {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(status)
			io.WriteString(w, body)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(status)
		for i := 0; i < len(body); i += 5 {
			io.WriteString(w, body[i:min(i+5, len(body))])
			w.(http.Flusher).Flush()
		}
	})
	k := startKP(t)
	team := k.addTeam("eng", nil)
	tok = k.addToken(team, nil)
	var seen []string
	for _, sc := range []struct{ scheme, key string }{{"bearer", echoKey}, {"basic", basicKey}} {
		for _, status := range []int{200, 401, 500} {
			for _, mode := range []string{"fixed", "stream"} {
				// A fresh service per case: a 401 takes its key out.
				svc := fmt.Sprintf("%s%d%s", sc.scheme, status, mode)
				k.addService(svc, up.URL, sc.scheme, nil)
				k.addKey(svc, sc.key, nil)
				resp, body := k.send("GET", "/v1/"+svc+"/"+sc.scheme+"/"+mode+"?status="+fmt.Sprint(status), tok, "")
				if resp.StatusCode != status {
					t.Fatalf("%s: status %d %.200s", svc, resp.StatusCode, body)
				}
				if !strings.Contains(string(body), "[redacted]") {
					t.Errorf("%s: nothing redacted: %.200s", svc, body)
				}
				seen = append(seen, svc+":\n"+string(body)+"\n"+fmt.Sprint(resp.Header))
			}
		}
	}
	if len(up.seen()) != 12 {
		t.Fatalf("%d upstream requests, want 12", len(up.seen()))
	}
	k.checkLogs()
	recs := usageDump(t, k)
	if strings.Count(recs, "\n") != 12 {
		t.Errorf("usage records:\n%s", recs)
	}
	seen = append(seen, k.logs.String(), recs)
	all := strings.Join(seen, "\n")
	for _, s := range []string{echoKey, basicKey, tok} {
		if l := testutil.Leak(all, s); l != "" {
			t.Errorf("%.10s… leaked as %s", s, l)
		}
	}
}

// TestTokenNeverForwardedOrLogged is issue 16 item 4 through keypoold: the
// team token sent in headers keypoold does not know by name, in query
// parameters and as X-Request-Id never reaches the upstream, the logs or
// the usage records; in the body it is refused with 400.
func TestTokenNeverForwardedOrLogged(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("openai", up.URL, "bearer", nil)
	k.addKey("openai", "sk-upstream-key-0123456789abcdef", nil)
	team := k.addTeam("eng", nil)
	tok := k.addToken(team, nil)

	req, _ := http.NewRequest("POST", k.url+"/v1/openai/v1/chat/completions?access_token="+tok+"&token="+tok+"&API_KEY="+tok+"&x=1",
		strings.NewReader(`{"model":"gpt-4o-mini","messages":[]}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+tok)
	for _, h := range []string{"Api-Key", "X-Auth-Token", "Ocp-Apim-Subscription-Key", "Anthropic-Api-Key", "X-Request-Id"} {
		req.Header.Set(h, tok)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	id := resp.Header.Get(server.RequestIDHeader)
	if id == "" || id == tok || strings.Contains(id, tok) {
		t.Errorf("request id %q: the token was kept as the id", id)
	}
	got := up.last()
	if all := got.Path + "?" + got.RawQuery + fmt.Sprint(got.Header) + got.Body; strings.Contains(all, tok) {
		t.Errorf("the token reached the upstream: %s", all)
	}
	if got.RawQuery != "x=1" || got.Header.Get("X-Request-Id") != id {
		t.Errorf("query %q, request id %q (want x=1 and %q)", got.RawQuery, got.Header.Get("X-Request-Id"), id)
	}

	// In the body: refused, not forwarded.
	n := len(up.seen())
	code, m, _ := k.do("POST", "/v1/openai/v1/chat/completions", tok, map[string]any{"model": "gpt-4o-mini", "user": tok})
	if code != 400 || fmt.Sprint(m["error"].(map[string]any)["code"]) != "bad_request" || strings.Contains(fmt.Sprint(m), tok) {
		t.Errorf("token in body: %d %v", code, m)
	}
	if len(up.seen()) != n {
		t.Errorf("the request with the token in its body reached the upstream")
	}

	// In the path: refused, and not logged (checkLogs below).
	if code, m, _ := k.do("GET", "/v1/openai/v1/files/"+tok, tok, nil); code != 400 || strings.Contains(fmt.Sprint(m), tok) {
		t.Errorf("token in path: %d %v", code, m)
	}
	if len(up.seen()) != n {
		t.Errorf("the request with the token in its path reached the upstream")
	}

	// The admin token as a request id is replaced too.
	req, _ = http.NewRequest("GET", k.url+"/admin/services", nil)
	req.Header.Set("Authorization", "Bearer "+k.admin)
	req.Header.Set("X-Request-Id", k.admin)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.Header.Get("X-Request-Id") == k.admin {
		t.Errorf("the admin token was kept as the request id (%v)", err)
	} else {
		resp.Body.Close()
	}

	// Request ids: sane ones are kept, others replaced.
	for _, tc := range []struct {
		id   string
		keep bool
	}{{"req-01.a_b:c", true}, {"has space", false}, {`quote"d`, false}, {"slash/id", false}, {strings.Repeat("a", 129), false}, {"ünicode", false}} {
		req, _ := http.NewRequest("GET", k.url+"/healthz", nil)
		req.Header.Set("X-Request-Id", tc.id)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if got := resp.Header.Get("X-Request-Id"); (got == tc.id) != tc.keep || got == "" {
			t.Errorf("X-Request-Id %q answered %q, keep=%v", tc.id, got, tc.keep)
		}
	}
	k.checkLogs()
	if recs := usageDump(t, k); strings.Contains(recs, tok) || recs == "" {
		t.Errorf("usage records hold the token (or none were written): %s", recs)
	}
}

// TestDotSegmentsAre400 is issue 14's and issue 16 item 10's paths: dot
// segments, plain or with ;parameters, are the proxy's 400 JSON error, not
// a redirect from ServeMux's path cleaning, and never reach the upstream.
func TestDotSegmentsAre400(t *testing.T) {
	up := newUpstream(t, okJSON)
	k := startKP(t)
	k.addService("svc", up.URL, "bearer", nil)
	k.addKey("svc", "sk-upstream-key-0123456789abcdef", nil)
	team := k.addTeam("eng", nil)
	tok := k.addToken(team, nil)
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, p := range []string{"/v1/svc/../admin/keys", "/v1/svc/./x", "/v1/svc//x", "/v1/../admin/keys", "/v1/svc/..;x=y/admin",
		"/v1/svc/.;/x", "/v1/svc/%2e%2e/admin", "/v1/svc/a/.."} {
		req, _ := http.NewRequest("GET", k.url+p, nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 || resp.Header.Get("Content-Type") != "application/json" || !strings.Contains(string(b), `"code":"bad_request"`) {
			t.Errorf("%s: %d %s %s", p, resp.StatusCode, resp.Header.Get("Location"), b)
		}
	}
	if n := len(up.seen()); n != 0 {
		t.Errorf("%d requests reached the upstream", n)
	}
	// Routes outside the proxy still work.
	if code, _, _ := k.do("GET", "/healthz", "", nil); code != 200 {
		t.Errorf("/healthz %d", code)
	}
}

// TestClientGoneMidStreamIs499: a client that hangs up after the first
// event of a stream is logged and recorded as 499, not 200.
func TestClientGoneMidStreamIs499(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-release:
		}
	})
	k := startKP(t)
	k.addService("svc", up.URL, "bearer", nil)
	k.addKey("svc", "sk-upstream-key-0123456789abcdef", nil)
	team := k.addTeam("eng", nil)
	tok := k.addToken(team, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", k.url+"/v1/svc/v1/chat/completions", strings.NewReader(`{"model":"m","stream":true}`))
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	if n, err := resp.Body.Read(buf); n == 0 || err != nil {
		t.Fatalf("first event: %v", err)
	}
	id := resp.Header.Get(server.RequestIDHeader)
	cancel()
	resp.Body.Close()
	// The usage record, read from the database once keypoold has stopped
	// (and written everything).
	if err := k.stop(); err != nil {
		t.Fatal(err)
	}
	if recs := usageDump(t, k); !strings.Contains(recs, id+" ") || !strings.Contains(recs, " status=499 ") {
		t.Errorf("usage records %s, want %s with status 499", recs, id)
	}
	eventually(t, "the access line", func() bool {
		for _, line := range strings.Split(k.logs.String(), "\n") {
			if strings.Contains(line, `"request_id":"`+id+`"`) && strings.Contains(line, `"msg":"request"`) {
				if !strings.Contains(line, `"status":499`) {
					t.Fatalf("access line %s, want status 499", line)
				}
				return true
			}
		}
		return false
	})
}

// TestAdminRefusesDuplicateFieldsAndDroppedHeaders: duplicate JSON fields
// in any admin body, and auth schemes naming a header the transport drops,
// are refused with a 400 naming the problem; in the YAML file too.
func TestAdminRefusesDuplicateFieldsAndDroppedHeaders(t *testing.T) {
	k := startKP(t)
	for _, tc := range []struct{ path, body, want string }{
		{"/admin/services", `{"name":"a","name":"b","base_url":"https://api.example.com"}`, `field \"name\" appears more than once`},
		{"/admin/teams", `{"name":"a","models_enabled":["x"],"name":"b"}`, `field \"name\" appears more than once`},
		{"/admin/services", `{"name":"a","base_url":"https://api.example.com","proxy_headers":{"X-A":"1","x-a":"2"}}`, `field \"proxy_headers.x-a\" appears more than once`},
		{"/admin/services", `{"name":"h","base_url":"https://api.example.com","auth_scheme":"header:Host"}`, "Host cannot carry a key"},
		{"/admin/services", `{"name":"h","base_url":"https://api.example.com","auth_scheme":"header:Content-Length"}`, "Content-Length cannot carry a key"},
		{"/admin/services", `{"name":"h","base_url":"https://api.example.com","auth_scheme":"header:Proxy-Authorization"}`, "Proxy-Authorization cannot carry a key"},
		{"/admin/services", `{"name":"h","base_url":"https://api.example.com","auth_scheme":"nope"}`, "header:<Name> or query:<name>"},
	} {
		req, _ := http.NewRequest("POST", k.url+tc.path, strings.NewReader(tc.body))
		req.Header.Set("Authorization", "Bearer "+k.admin)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 || !strings.Contains(string(b), tc.want) {
			t.Errorf("%s %s: %d %s, want 400 with %q", tc.path, tc.body, resp.StatusCode, b, tc.want)
		}
	}
	if code, m, _ := k.do("GET", "/admin/services", k.admin, nil); code != 200 || strings.Contains(fmt.Sprint(m), `"b"`) {
		t.Errorf("services after refusals: %d %v", code, m)
	}
	for _, scheme := range []string{"header:Host", "header:Transfer-Encoding", "header:Connection", "header:Keep-Alive", "header:TE"} {
		doc := "services:\n  - name: s\n    base_url: https://api.example.com\n    auth_scheme: " + scheme + "\n"
		cfg, err := server.ParseConfig([]byte(doc), func(string) (string, bool) { return "", false })
		if err == nil {
			err = cfg.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), "cannot carry a key") {
			t.Errorf("YAML auth_scheme %s: %v", scheme, err)
		}
	}
}

// usageDump returns every usage record of a stopped keypoold, one line
// each, read from its database.
func usageDump(t *testing.T, k *kp) string {
	t.Helper()
	db, err := sql.Open("sqlite3", filepath.Join(k.dir, "keypool.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query(`SELECT request_id, team_id, token_id, service, key_id, model, status FROM usage_records`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var b strings.Builder
	for rows.Next() {
		var id, team, token, svc, key, model string
		var status int
		if err := rows.Scan(&id, &team, &token, &svc, &key, &model, &status); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s team=%s token=%s service=%s key=%s model=%s status=%d \n", id, team, token, svc, key, model, status)
	}
	return b.String()
}
