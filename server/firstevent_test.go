package server_test

import (
	"bufio"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestFirstStreamEventIsNotHeldBack: keypoold hands a stream's first
// event to the client as soon as the upstream flushes it, metered or not
// (the scrubber, the meter and the usage-chunk option hold no event
// back): the upstream sends one event and then waits until the client
// has read it through keypoold.
func TestFirstStreamEventIsNotHeldBack(t *testing.T) {
	for _, family := range []string{"none", "openai"} {
		t.Run("llm_family="+family, func(t *testing.T) {
			got := make(chan struct{})
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "text/event-stream")
				_, _ = io.WriteString(w, `data: {"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"hi"}}]}`+"\n\n")
				w.(http.Flusher).Flush()
				select { // the next event only once the client has the first
				case <-got:
				case <-time.After(10 * time.Second):
				case <-r.Context().Done():
					return
				}
				_, _ = io.WriteString(w, `data: {"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}`+"\n\ndata: [DONE]\n\n")
			})
			k := startKP(t)
			k.addService("openai", up.URL, "bearer", map[string]any{"llm_family": family})
			k.addKey("openai", "sk-first-event-0123456789abcdef", nil)
			tok := k.addToken(k.addTeam("eng", nil), nil)
			req, _ := http.NewRequest("POST", k.url+"/v1/openai/v1/chat/completions",
				strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}`))
			req.Header.Set("Authorization", "Bearer "+tok)
			t0 := time.Now()
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			line, err := bufio.NewReader(resp.Body).ReadString('\n')
			waited := time.Since(t0)
			close(got)
			t.Logf("first event after %v", waited)
			if err != nil || !strings.HasPrefix(line, `data: {"model":"gpt-4o-mini","choices":[{`) {
				t.Fatalf("first line %q, %v", line, err)
			}
			if waited > 5*time.Second {
				t.Errorf("the first event took %v: held back until the upstream sent more", waited)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
		})
	}
}
