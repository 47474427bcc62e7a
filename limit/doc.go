// Package limit enforces client-side limits for keypoold: request rates
// (rpm_limit), tokens per minute (tpm_limit) and token and cost budgets
// with warn and block thresholds per hour, day, month and in total. It
// limits clients (teams, tokens, services), never upstream keys.
//
// Three interfaces keep the server backend-agnostic: a [Limiter] admits
// requests against a per-minute rate, a [Counter] keeps windowed usage and
// admits requests against reservations, and an [Admitter] admits one
// request on several counters at once (token, team and service budgets,
// in tokens and USD), all or none, and a [Settler] settles it on them
// all. [Local] implements them in process; [Redis] implements them across
// replicas with one atomic Lua script per call: Allow, Reserve,
// ReserveAll and SettleAll (every counter of a request in one round trip)
// and Settle; concurrent ReserveAll calls of one replica share a script
// run per batch (the calls that arrive while one is in flight), and so
// do concurrent settlements. Every method takes now as an argument, so
// tests fake time.
//
// # Request rate
//
// [Limiter.Allow] is a sliding-window log: it admits a request when fewer
// than limit requests were admitted for the key in (now-1m, now]. So
// rpm_limit: 5 admits 5 requests in any minute and refuses the 6th, with
// RetryAfter = (time of the oldest admission still counted) + 1m - now,
// the instant the next request will be admitted. Refused requests are not
// counted. (A token bucket or GCRA with burst 5 would admit a 6th request
// within the first minute; the log does not.) Local is exact to the
// nanosecond for limits up to 1024 per minute and counts per second above
// that: still never more than limit in any minute, but a refusal may last
// up to a second longer. Redis is exact to the microsecond.
//
// # Budgets and reservations
//
// A [Limit] is a Warn and a Block threshold over a [Window]: Minute
// (sliding), Hour, Day, Month (calendar periods in UTC: the hour, day or
// month in UTC that contains now, see [WindowBounds]) or Total (never
// resets). [Counter.Reserve] admits a request while, for every limit, the
// settled usage u in the window plus the outstanding reservations r of
// requests already in flight is below Block (u+r < Block), whatever the
// request's own estimate a (max tokens, a default cost); it then holds a
// until the request settles. So the first request under any budget goes
// through, sequential requests go through until the limit is reached, and
// a spent budget (u+r >= Block) admits nothing, not even a zero estimate.
// A warn threshold (u+r+a >= Warn) sets [Decision.Warn] and never refuses.
// [Counter.Settle] releases the reservation and charges the actual amount
// to the windows containing the settle time. A refusal's RetryAfter is the
// end of the calendar window (Hour, Day, Month), the time until enough
// usage leaves the sliding minute (Minute), or zero (Total: it never
// resets); when several limits refuse, the one lifted last is reported.
// [Decision.Used] and [Decision.Reserved] say what was settled and what
// was held at the decision.
//
// tpm_limit is a Minute limit reserved with a zero estimate: admission
// requires the minute's usage to be below the limit, and Settle adds the
// tokens when the response completes. Minute amounts count per second: an
// amount charged during second s counts until second s+61 starts (at least
// 60 s). daily_token_limit and the limit_* thresholds are Day, Hour,
// Month and Total limits; pass all of a key's limits in one Reserve.
//
// # Overspend bound
//
// Admission is checked and the reservation taken atomically (under one
// lock in Local, in one Lua script in Redis). Every admitted request saw
// u+r < Block, so the requests admitted in a window spend at most
//
//	Block + a_last + Σ max(0, actual_i - estimate_i)
//
// where a_last is the actual usage of the last request admitted (the one
// that crossed the limit: it was admitted with room left, however large
// it turned out) and the sum runs over the requests admitted while others
// were in flight (a request that spends more than it reserved lets others
// in on room it then uses). With estimate = actual (max_tokens set and
// used) the overspend is below one request: 500 concurrent requests of
// 150 tokens against 10 000 admit exactly 67. A zero estimate, as for
// tpm, makes each term the request's whole actual amount. Beyond that
// bound a budget is overspent only by
//   - reservations released by their TTL (default 15 minutes) before their
//     request settles: their room is handed to others while the late
//     Settle still charges;
//   - Redis being unreachable with the fail-open policy
//     (FailClosedBudget refuses instead, keypoold's default;
//     FailLocalBudget holds the bound of the Failure section);
//   - several replicas each using Local: each counts only its own traffic.
//
// # Failure
//
// Local never fails. Redis bounds every call by RedisConfig.Timeout
// (default 250ms) and never hangs; when Redis cannot be reached, Allow and
// Reserve admit (the default) or refuse per FailClosedRate and
// FailClosedBudget, with [Decision.Degraded] set and one warning logged per
// outage; Settle, Add and Usage return an error wrapping [ErrUnavailable].
// With FailLocalBudget, ReserveAll admits on this replica's share of each
// counter's remaining budget instead (room at its last decision ÷ live
// replicas, counted by a heartbeat on Redis): across N replicas a
// counter's outage spends at most the room left + what was admitted after
// the stalest replica's last decision + N × one request's actual.
// A caller whose context is done gets its context's error. A circuit
// breaker (gobreaker) opens after 3 failed calls in a row and fails every
// call at once for RedisConfig.BreakerOpen (default 1s): while Redis is
// down a request pays the Timeout at most once per window. While it is
// open, a watcher PINGs Redis every 100 ms and closes it as soon as Redis
// answers; if the open period ends first, one call probes (half-open)
// and the calls arriving meanwhile wait for its answer, then go to Redis.
//
// Settlement is idempotent by reservation id: a settle replayed (after a
// failure, or late) charges once. A reserve whose reply was lost (a
// timeout after Redis ran it), a settle that failed and the settlements of
// local-share admissions are queued and replayed, idempotently, by the
// watcher once Redis answers again. With RedisConfig.RequireSeed,
// ReserveAll waits (at most SeedWait) while Redis holds no epoch key, until
// [Redis.ClaimSeed]'s caller has re-seeded the counters from the usage
// records, and then admits or follows the fail policy.
//
// # Concurrency
//
// [Local] and [Redis] are safe for concurrent use. Local starts no
// goroutine and its Close does nothing. Redis runs one watcher goroutine
// (breaker recovery, replay of queued settlements, heartbeat) until
// Close, and a short-lived poller while calls wait for a seed. Local's
// Allow takes about 100 ns and allocates nothing in steady state; state is
// sharded 64 ways by key hash.
package limit
