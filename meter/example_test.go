package meter_test

import (
	"fmt"
	"io"
	"strings"

	"github.com/keypool/keypool/meter"
)

// A proxy meters an OpenAI stream that it asked for usage on, and hides the
// usage chunk from the client that did not ask for it.
func ExampleNewReader() {
	req := []byte(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}],"stream":true}`)
	info := meter.InspectRequest(req)
	req, added := info.WithStreamUsage(req) // send this body upstream
	fmt.Println(string(req))

	upstream := io.NopCloser(strings.NewReader(
		`data: {"model":"gpt-4o-mini-2024-07-18","choices":[{"delta":{"content":"Hello"}}],"usage":null}` + "\n\n" +
			`data: {"model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":1000000,"completion_tokens":500000}}` + "\n\n" +
			"data: [DONE]\n\n"))
	prices := meter.DefaultPrices()
	body := meter.NewReader(upstream, meter.Options{
		Family:          meter.FamilyOpenAI,
		Model:           info.Model,
		ContentType:     "text/event-stream",
		StripUsageChunk: added,
		OnDone: func(u meter.Usage) {
			usd, _ := prices.Cost(u)
			fmt.Printf("%s: %d in, %d out, $%.2f\n", u.Model, u.InputTokens, u.OutputTokens, usd)
		},
	})
	client, _ := io.ReadAll(body) // the proxy's copy loop
	body.Close()
	fmt.Print(string(client))
	// Output:
	// {"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}],"stream":true,"stream_options":{"include_usage":true}}
	// gpt-4o-mini-2024-07-18: 1000000 in, 500000 out, $0.45
	// data: {"model":"gpt-4o-mini-2024-07-18","choices":[{"delta":{"content":"Hello"}}],"usage":null}
	//
	// data: [DONE]
}

// Per-service prices override the shipped list prices; dated snapshots
// find their base model.
func ExamplePriceTable_Merge() {
	prices := meter.DefaultPrices().Merge(map[string]meter.Price{
		"llama-3.3-70b-versatile": {Input: 0.50, Output: 0.70},
	})
	for _, m := range []string{"llama-3.3-70b-versatile", "claude-sonnet-4-20250514"} {
		p, _ := prices.Lookup(m)
		fmt.Printf("%s: $%.2f in, $%.2f out per 1M tokens\n", m, p.Input, p.Output)
	}
	// Output:
	// llama-3.3-70b-versatile: $0.50 in, $0.70 out per 1M tokens
	// claude-sonnet-4-20250514: $3.00 in, $15.00 out per 1M tokens
}
