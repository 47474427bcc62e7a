// Package proxy sends HTTP requests with keys from a [keypool.Pool]: a
// [Transport] (an http.RoundTripper) for Go clients, and a [Handler] (a
// reverse proxy serving /v1/{service}/...) for keypoold's data plane.
//
// # Transport
//
// Put a Transport under any http.Client; every request to the service's
// base URL gets a pooled key, and a request that is rate-limited, rejected
// (401, an invalid-key code), out of quota (402) or failing (5xx, resets,
// timeouts) on one key is retried on another; refusals about the key do
// not spend MaxAttempts, ambiguous failures do, and a bare 403 repeated on
// a second key is returned as the request's:
//
//	pool, _ := keypool.New(keypool.Config{})
//	_ = pool.SetService(keypool.Service{Name: "openai", BaseURL: "https://api.openai.com", Auth: keypool.Bearer}, keys)
//	client := &http.Client{Transport: &proxy.Transport{Pool: pool, Service: "openai"}}
//	resp, err := client.Post("https://api.openai.com/v1/chat/completions", "application/json", body)
//
// Relative URLs ("/v1/models") are resolved against the base URL. When no
// key can serve the first attempt, the error is a *keypool.NoKeyError
// saying when to come back; when keys were tried and failed, the last
// upstream answer is returned as it is. Per-request choices ride on the
// context: [WithService], [WithAffinity], [WithFeature].
//
// # Handler
//
// A Handler serves ANY /v1/{service}/{rest} → {base_url}/{rest} with the
// client's team token taken from wherever its SDK puts an API key
// ([Credential]), checked by Handler.Authorize, and removed before the
// request leaves, together with cookies and forwarding headers. Bodies are
// buffered (up to MaxBodyBytes) so that failover replays them byte for
// byte before anything is written to the client; streams (SSE) are flushed
// as they arrive and WebSocket upgrades pass through.
//
// Each request a Handler serves has one [Record], its state from arrival
// to the end of the response: the hooks (Authorize, Prepare,
// ModifyResponse, OnDone) reach it with [RecordOf], keep their own state
// in it (Record.Data) and end the request with [Record.Stop]; the
// Transport notes each attempt's key on it; OnDone gets its [Result]. A
// hook refuses a request with any status through an [Error]. One
// [ResponseWriter] counts what is written; the Handler adds none when it
// is given one.
//
// # Secrets
//
// A key's secret is only ever set on the Transport's private copy of a
// request sent to the service's origin. Every spelling of it an upstream
// may echo — as is, percent-encoded (query and path forms, either hex
// case), JSON-escaped (\u0026, \u003c, \/ …) and base64 (standard and URL
// alphabets, at each alignment, so user:key and key: are covered) — is
// scrubbed (replaced by [Redacted]) from the headers, trailers and bodies
// of answers of every status, streamed bodies included, and from errors
// (including a *url.Error's URL, which carries query-parameter keys); it is
// never logged. A Handler does the same for the client's team token, which
// it also strips from every header and query parameter holding it (by
// value, whatever their names) and refuses (400) in the path or body.
//
// # Concurrency
//
// Transport and Handler are safe for concurrent use once configured; do not
// change their fields while they serve requests.
package proxy
