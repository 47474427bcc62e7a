package main

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestMeteringFromTheAnswer runs keypoold (this binary, as in
// TestKillNineLosesNoUsage) in front of a stand-in on loopback, a host
// keypoold does not know, serving on a path that names no API
// ("/generate"), with no llm_family: the answer alone says how to meter.
// An OpenAI-shaped stream with usage in its last chunk is charged those
// tokens; one without usage is charged what was observed (30 streamed
// words, the input from the request), not its output reservation; an
// answer of another shape is charged nothing.
func TestMeteringFromTheAnswer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts keypoold as a child process")
	}
	const words = 30
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		chunk := func(content string) string {
			return `data: {"id":"c1","object":"chat.completion.chunk","model":"local-llm","choices":[{"index":0,"delta":{"content":"` + content + `"},"finish_reason":null}]}` + "\n\n"
		}
		switch r.URL.Query().Get("shape") {
		case "usage":
			w.Header().Set("Content-Type", "text/event-stream")
			_, _ = io.WriteString(w, chunk("Hello")+chunk(" there"))
			_, _ = io.WriteString(w, `data: {"id":"c1","object":"chat.completion.chunk","model":"local-llm","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}`+"\n\ndata: [DONE]\n\n")
		case "nousage":
			w.Header().Set("Content-Type", "text/event-stream")
			for range words {
				_, _ = io.WriteString(w, chunk("word"))
			}
			_, _ = io.WriteString(w, "data: [DONE]\n\n")
		default:
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"results":[{"title":"a page","text":"some text of the page"}],"model":"search-v2"}`)
		}
	}))
	defer up.Close()

	k := startCrashKP(t, t.TempDir(), freeAddr(t))
	defer k.stop()
	k.adminJSON("POST", "/admin/services", map[string]any{"name": "selfhosted", "base_url": up.URL})
	k.adminJSON("POST", "/admin/keys", map[string]any{"service": "selfhosted", "key_value": "sk-selfhosted-0123456789abcdef"})
	team := k.adminJSON("POST", "/admin/teams", map[string]any{"name": "eng"})
	tok := k.adminJSON("POST", "/admin/tokens", map[string]any{"name": "t", "team_id": team["id"]})["token"].(string)

	body := `{"model":"local-llm","stream":true,"messages":[{"role":"user","content":"say thirty words"}]}`
	for _, shape := range []string{"usage", "nousage", "other"} {
		req, _ := http.NewRequest("POST", k.url+"/v1/selfhosted/generate?shape="+shape, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d %s", shape, resp.StatusCode, b)
		}
	}
	// One record per request, flushed within the usage writer's second.
	var rows []any
	for deadline := time.Now().Add(15 * time.Second); ; {
		rows, _ = k.adminJSON("GET", "/admin/usage?service=selfhosted&group_by=day", nil)["rows"].([]any)
		if len(rows) == 1 && rows[0].(map[string]any)["requests"] == float64(3) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("usage rows %v, want 3 requests", rows)
		}
		time.Sleep(100 * time.Millisecond)
	}
	in := int64((len(body) + 3) / 4) // the request's input estimate
	row := rows[0].(map[string]any)
	gotIn, gotOut := int64(row["tokens_in"].(float64)), int64(row["tokens_out"].(float64))
	// usage: 11 in, 7 out; nousage: the estimate in, 30 out; other: 0.
	if wantIn, wantOut := 11+in, int64(7+words); gotIn != wantIn || gotOut != wantOut {
		t.Errorf("charged %d tokens in and %d out over the three answers, want %d and %d (%s)", gotIn, gotOut, wantIn, wantOut,
			fmt.Sprint(row))
	}
}
