// Package server assembles keypoold: the store, the key pool and its
// syncer, client authentication and limits, the /v1/{service}/… proxy,
// the admin API, key leasing, health, metrics, access logs, usage records
// and graceful shutdown, behind one [http.Handler].
//
// The HTTP contract it serves is the one in DESIGN.md; cmd/keypoold only
// reads configuration and calls [New] and [Server.Run]. Embed it the same
// way:
//
//	srv, err := server.New(ctx, server.Config{Database: "sqlite:./data/keypool.db"})
//	if err != nil { … }
//	err = srv.Run(ctx) // until ctx is done; then drains and returns nil
//
// # Endpoints
//
//	ANY  /v1/{service}/{rest}   proxy with a pooled key (team token)
//	POST /v1/{router}/v1/{rest} a router: by the body's model, to one target service after another (see routers.go)
//	     /admin/…               admin API (admin token)
//	GET  /key?service=&feature= lease a raw key (admin token, or a token with scope "lease")
//	POST /key/{key_id}/report   report what a leased key met (with its lease_id)
//	GET  /healthz, /health      liveness
//	GET  /services              a client's services and models
//	GET  /readyz                store reachable and pools loaded
//	GET  /metrics               Prometheus
//	GET  /                      redirects to the web console, /console/ (package console)
//
// # Client limits
//
// A team's and a token's rpm_limit (and a service's own rpm_limit, shared
// by all its clients) are enforced per minute through a [limit.Limiter]:
// in process, or in Redis when [Config.RedisURL] is set so that several
// replicas share them. A refusal is 429 rate_limited with Retry-After,
// distinct from 429 no_key_available (every upstream key busy). A team
// with allowed_services may use only those (403 forbidden). Every client
// token may use the proxy; leasing raw keys needs the "lease" scope.
// Clients that keep presenting bad tokens are refused (429 rate_limited)
// per address, without a store lookup.
//
// # Leases and reports
//
// GET /key answers {"key_id","service","value","lease_id","expires_at"};
// the lease holds the key (one request in flight) until it is reported or
// [Config.LeaseTTL] passes. POST /key/{key_id}/report takes
// {"lease_id","outcome","retry_after"}: only the token that took the
// lease, while its team may use the service, before it expires, once.
// A client token's "invalid" or "exhausted" counts
// as a "refused": one strike, confirmed by the service's confirm_refusals
// reports from distinct leases and never below its min_active_keys; the
// admin token's reports apply as they are. Errors: 400 bad_request without lease_id (only the admin token reports
// on a key without a lease), 404 lease_not_found (unknown, another key's,
// or held by another replica: leases live in the process that handed
// them out), 403 forbidden (another token's lease), 409 lease_reported,
// 410 lease_expired.
//
// # Timeouts and revocation
//
// Each proxied attempt waits at most [Config.UpstreamHeaderTimeout] (10
// min; a service's header_timeout overrides it) for response headers, then
// counts as a Failure of its key and fails over; body reads wait at most
// [Config.UpstreamIdleTimeout] (5 min; idle_timeout) and a whole request
// [Config.UpstreamTimeout] (30 min; request_timeout), answered 504
// upstream_timeout or, in a stream, with a final SSE error event. Request
// bodies are cut with 408 request_timeout after [Config.BodyIdleTimeout]
// without a byte or [Config.BodyTimeout] in all. Revoking a token,
// removing its team or user, or disabling or deleting a key ends the open
// requests, SSE streams and WebSockets they hold on this replica before
// the admin call answers (see streams.go).
//
// # Metering, budgets and model allow-lists
//
// Requests to a service of an LLM family (its llm_family, or detected from
// the path when empty) are metered: the buffered request body gives the
// model, stream flag and output cap; OpenAI-compatible streams are asked
// for their usage chunk, which is hidden again from a client that did not
// ask for it; the answer is read as it streams past (package meter) and
// priced with the shipped table, [Config.PricesFile] and the service's own
// prices. Each finished request writes a usage record, settles its budget
// reservations and charges the serving key's balance in its unit (usd,
// tokens or requests; a spent key turns exhausted).
//
// Token and cost budgets (tpm_limit, daily_token_limit, limit_tokens_*,
// limit_cost_*) on the token, the team and the service are checked through
// the [limit.Counter] before a key is picked: each request reserves an
// estimate (request body bytes / 4 input tokens plus its max_tokens, or
// [Config.DefaultOutputTokens]; its cost at the model's prices) and
// settles with the metered actuals, also on errors and cancellations. A
// block threshold refuses with 429 budget_exceeded and Retry-After at the
// end of the UTC window; a warn threshold sets [HeaderBudgetWarning], logs
// and counts, and never refuses. Windows are calendar-aligned in UTC
// (hour, day, month) or total; tpm_limit is a sliding minute. A request is
// admitted while the window's settled usage plus the reservations of the
// requests already in flight is below the block threshold, so the first
// request under any budget goes through; a budget is overspent by at most
// the last admitted request's actual usage plus the sum, over concurrently
// admitted requests, of their actual usage above their estimate (see
// packages budget and limit). The in-process counters are seeded from
// stored usage at start.
//
// models_enabled on a service, team or token restricts the models a
// request may name (403 forbidden naming the model), and GET
// /v1/{service}/models and /v1/{service}/v1/models list the caller's
// enabled models when the service has an allow-list. README.md has the
// details.
//
// # Shutdown
//
// [Server.Shutdown] (and [Server.Run] when its context ends) stops
// accepting connections, lets in-flight requests finish for up to
// [Config.DrainTimeout] (30 s by default) and then closes the connections
// left, closes hijacked connections (WebSockets), stops background work,
// writes every pending usage record and key state change, and closes the
// store.
//
// A Server is safe for concurrent use.
package server
