// Package keypool pools upstream API keys and spends them well.
//
// A [Pool] holds services (an upstream API and how to authenticate to it)
// and their keys. For each request it picks a key with the service's
// [Selector], and learns from the answer reported back through the
// [Lease]: a 429 cools the key down until the upstream's Retry-After
// (clamped to a cap, never discarded), a 401 or an invalid-key code takes
// it out of rotation as invalid, a 402 or an exhausted quota marks it
// exhausted, and repeated 5xx or connection failures open its circuit
// breaker (package breaker) for a period that grows with each ejection in
// a row, for at most a share of the service's keys at once. A bare 403 is
// ambiguous ([Refused]): only repeated refusals from distinct requests,
// above a floor of keys in rotation, make a key invalid. A key back from a
// cooldown or an ejection takes one probe request before full traffic.
// The next request is routed around every key that cannot serve.
//
// Most programs do not call [Pool.Acquire] themselves: they put a
// proxy.Transport under an http.Client, which picks a key, injects it with
// the service's [AuthScheme], and retries on another key when one is
// rate-limited, revoked or failing:
//
//	pool, _ := keypool.New(keypool.Config{})
//	pool.SetService(keypool.Service{
//		Name: "openai", BaseURL: "https://api.openai.com",
//		Auth: keypool.Bearer, RateLimitRPM: 60,
//	}, []keypool.Key{
//		{ID: "a", Secret: keypool.Secret(os.Getenv("OPENAI_KEY_A"))},
//		{ID: "b", Secret: keypool.Secret(os.Getenv("OPENAI_KEY_B"))},
//	})
//	client := &http.Client{Transport: &proxy.Transport{Pool: pool, Service: "openai"}}
//
// keypoold, the server in cmd/keypoold, does the same for any SDK pointed
// at it with a team token.
//
// # Choosing keys
//
// Selectors see only keys in rotation, so a pool where 99% of keys are
// cooling down costs no more per pick than a small one: each service keeps
// a set of available keys, updated on the rare state changes, and a
// min-heap of cooldown expiries that Acquire checks against its clock to
// re-admit keys lazily. Built-ins: [RoundRobin] (the default), [Weighted],
// [Random], [LeastInFlight], [LeastUsed], [Latency], [Sticky] and
// [Ordered]; [ParseSelector] maps config names to them, and
// [SelectorFunc] adapts a function. A selector sees each key through
// [Candidate]'s read-only methods, the only ones the built-ins use, so a
// variant of any of them can be written outside this package.
//
// Per-key limits ([Key.RateLimitRPM], [Key.MaxInFlight]) take a key out of
// rotation while it is at its limit, so the pool never picks a key over
// either while another key has room.
//
// # Reloads and replicas
//
// [Pool.SetService] replaces a service's keys; keys that keep their ID and
// Secret keep their live state, so a reload never resets a cooldown, a
// breaker or a counter. State changes are reported as [Event] values to
// [Config.OnEvent], and [Pool.Apply] applies an event from elsewhere, so
// replicas can share what each learned.
//
// # Changing a key's state
//
// A key's state changes in two ways, and every change is delivered to
// [Config.OnEvent]:
//
//   - Outcomes: what a request with the key met. [Lease.Release] reports
//     it for a leased request; [Pool.Report] for a key used without its
//     lease; [Pool.Spend] is Report of a cost learned after the release.
//     The pool decides the state (cooldown, breaker, refusal strikes).
//   - Events: a state decided or learned elsewhere, set as given.
//     [Pool.Apply] takes an [Event] from another replica and
//     emits it with Event.Remote set, so a listener that shares or
//     persists events skips it and nothing echoes back;
//     [Pool.SetKeyState] is an admin's decision taken here, emitted like
//     the pool's own. [Key.State], recorded by the key's owner, is
//     applied by [Pool.SetService] only when it differs from the value
//     of the previous load, so a reload does not undo what the pool
//     learned since.
//
// # Concurrency
//
// A Pool is safe for concurrent use. Acquire and Release allocate nothing
// in steady state and take a per-service lock for a few hundred
// nanoseconds at most. Time comes from [Config.Now], so tests can use a
// fake clock.
//
// # Secrets
//
// A [Secret] prints as "[redacted]" through fmt, encoding/json and
// log/slog; only [Secret.Reveal] returns the value, and [Secret.Hint]
// gives a masked form for listings.
package keypool
