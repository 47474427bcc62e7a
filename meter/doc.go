// Package meter reads LLM token usage from requests and responses as they
// pass through a proxy, and prices it.
//
// It never buffers a response: a [Reader] wraps the upstream body and
// watches the bytes as the proxy's copy loop reads them, with a byte search
// for the family's usage and model keys and a small state machine for
// their values. Memory per response is a few hundred bytes, plus a pooled
// buffer when a usage object straddles two reads, or when an OpenAI usage
// chunk is being stripped (below). Framing does not matter: one JSON
// document, an SSE stream, or Gemini's streamed JSON array are metered
// alike, however the reads split them.
//
// # Wiring it into a reverse proxy
//
// Request side, with the body already buffered (the proxy keeps it for
// retries anyway):
//
//	info := meter.InspectRequest(body) // model, stream, include_usage
//	model := info.Model
//	if fam == meter.FamilyGemini {
//		model = meter.ModelFromPath(req.URL.Path)
//	}
//	strip := false
//	if fam == meter.FamilyOpenAI && info.Stream && meter.AcceptsStreamOptions(req.URL.Path) {
//		body, strip = info.WithStreamUsage(body) // ask for the usage chunk, without reading body again
//	}
//	meter.NegotiateIdentity(req.Header) // no gzip on metered routes
//
// Response side, in ModifyResponse (or a RoundTripper):
//
//	meter.WrapResponse(resp, meter.Options{
//		Family:          fam,
//		Model:           model,
//		StripUsageChunk: strip, // the client did not ask for usage: hide the chunk
//		OnDone: func(u meter.Usage) {
//			usd, _ := prices.Cost(u)
//			record(u, usd) // settle the reservation, debit the key
//		},
//	})
//
// OnDone fires exactly once, at EOF or at Close (a client that hung up
// mid-stream gives Complete == false). Prices come from a [PriceTable]:
// [DefaultPrices] ships list prices (prices.yaml), and
// DefaultPrices().Merge(overrides) applies a service's own.
//
// # Compression
//
// A Reader does not decompress. Call [NegotiateIdentity] on metered
// requests; a response that still arrives compressed passes through
// untouched and unmetered (Found == false).
//
// # Concurrency
//
// [PriceTable] is immutable and safe for concurrent use. A [Reader] is
// read by one goroutine; Close and Usage may be called from another. The
// request helpers are pure functions.
package meter
