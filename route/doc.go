// Package route is keypoold's model router: a service of kind "router"
// gives an application one OpenAI-compatible base URL,
// http://HOST/v1/{router}/v1, for every model its routes name, and falls
// back across the services that serve a model when one cannot.
//
// A router's routes ([store.Route]) map a model name — exact, or a glob
// such as "claude-*" (* and ? match '/' too) — to ordered targets
// ([store.Target]): a service, the path prefix of its OpenAI-compatible
// API ("/v1" by default; "/v1beta/openai" for Gemini), optionally the
// model to send upstream (an alias such as "fast"), and optionally a
// weight that spreads the first choice over several services. Exact
// routes win over globs; globs are tried in the order given.
//
// [Compile] and [Validate] check routes (an unknown target service, a
// target that is itself a router, an empty target list, a bad glob) and
// build a [Table]; [Handler] serves requests with it, sending each
// attempt through keypoold's proxy as a request to the target service,
// so that the target's key pool, failover, limits, budgets, metering and
// streaming apply as on a direct call. [AttemptFrom] tells the proxy's
// hooks that a request is a routed attempt, and of which router.
//
// Everything here is safe for concurrent use.
package route
