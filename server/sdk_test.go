package server_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go"
	aoption "github.com/anthropics/anthropic-sdk-go/option"
	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
)

// TestOpenAISDK drives keypoold with the official OpenAI Go SDK, the team
// token as its API key, against a local upstream whose first key is rate
// limited: the SDK gets its answer, the upstream only ever sees pooled
// keys.
func TestOpenAISDK(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if bearerKey(r.Header) == keyA {
			w.Header().Set("Retry-After", "20")
			w.WriteHeader(429)
			_, _ = io.WriteString(w, `{"error":{"message":"slow down","type":"rate_limit_error"}}`)
			return
		}
		if strings.Contains(r.Header.Get("Accept"), "text/event-stream") || strings.Contains(readBody(r), `"stream":true`) {
			w.Header().Set("Content-Type", "text/event-stream")
			for i, tok := range []string{"Hel", "lo"} {
				fmt.Fprintf(w, "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":%q}}]}\n\n", tok)
				w.(http.Flusher).Flush()
				_ = i
			}
			_, _ = io.WriteString(w, "data: [DONE]\n\n")
			return
		}
		okJSON(w, r)
	})
	k := startKP(t)
	tok, ids := setup(t, k, up, nil, keyA, keyB)

	client := openai.NewClient(
		option.WithBaseURL(k.url+"/v1/openai/v1/"),
		option.WithAPIKey(tok),
		option.WithMaxRetries(0),
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var resp *http.Response
	for i := range 2 {
		cc, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
			Model:    openai.ChatModelGPT4oMini,
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hello")},
		}, option.WithResponseInto(&resp))
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if cc.Choices[0].Message.Content != "hi" || cc.Usage.PromptTokens != 11 {
			t.Errorf("completion %+v", cc)
		}
		if got := resp.Header.Get("X-Keypool-Key-Id"); got != ids[1] {
			t.Errorf("served by %q, want %q", got, ids[1])
		}
	}

	stream := client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
		Model:    openai.ChatModelGPT4oMini,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("stream")},
	})
	var text strings.Builder
	for stream.Next() {
		if ch := stream.Current(); len(ch.Choices) > 0 {
			text.WriteString(ch.Choices[0].Delta.Content)
		}
	}
	if err := stream.Err(); err != nil || text.String() != "Hello" {
		t.Errorf("stream: %q, %v", text.String(), err)
	}

	for i, s := range up.seen() {
		if !strings.HasPrefix(s.Path, "/v1/chat/completions") {
			t.Errorf("upstream request %d path %q", i, s.Path)
		}
		if got := bearerKey(s.Header); got != keyA && got != keyB {
			t.Errorf("upstream request %d carried %q, not a pooled key", i, got)
		}
		if strings.Contains(fmt.Sprint(s.Header), tok) {
			t.Errorf("upstream request %d carried the team token", i)
		}
	}
	k.checkLogs()
}

func readBody(r *http.Request) string {
	b, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(strings.NewReader(string(b)))
	return string(b)
}

// TestAnthropicSDK drives keypoold with the official Anthropic Go SDK. The
// SDK sends the team token in x-api-key; the upstream must get the pooled
// key there instead.
func TestAnthropicSDK(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Api-Key") != keyC || r.Header.Get("Anthropic-Version") == "" {
			w.WriteHeader(401)
			_, _ = io.WriteString(w, `{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}`)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"id":"msg_1","type":"message","role":"assistant","model":"claude-3-5-haiku-latest","content":[{"type":"text","text":"bonjour"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":9,"output_tokens":3}}`)
	})
	k := startKP(t)
	k.addService("anthropic", up.URL, "x-api-key", nil)
	k.addKey("anthropic", keyC, nil)
	team := k.addTeam("research", nil)
	tok := k.addToken(team, nil)

	client := anthropic.NewClient(
		aoption.WithBaseURL(k.url+"/v1/anthropic/"),
		aoption.WithAPIKey(tok),
		aoption.WithMaxRetries(0),
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	msg, err := client.Messages.New(ctx, anthropic.MessageNewParams{
		Model:     "claude-3-5-haiku-latest",
		MaxTokens: 64,
		Messages:  []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("hello"))},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(msg.Content) == 0 || msg.Content[0].Text != "bonjour" || msg.Usage.InputTokens != 9 {
		t.Errorf("message %+v", msg)
	}
	s := up.last()
	if s.Path != "/v1/messages" || s.Header.Get("X-Api-Key") != keyC {
		t.Errorf("upstream got path %q x-api-key %q", s.Path, s.Header.Get("X-Api-Key"))
	}
	if strings.Contains(fmt.Sprint(s.Header), tok) {
		t.Error("the team token reached the upstream")
	}
	k.checkLogs()
}
