package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/limit"
)

// Fail policies of [LimitsConfig]: what admission does while Redis cannot
// be reached.
const (
	// FailOpen admits, uncounted.
	FailOpen = "open"
	// FailClosed refuses with 503 and Retry-After 1.
	FailClosed = "closed"
	// FailLocal (budgets only) admits on the replica's share of each
	// budget's remaining room, as last seen on Redis, divided by the
	// number of live replicas; past it, or for a budget the replica has
	// no figure for, it refuses as FailClosed.
	FailLocal = "local"
)

// Defaults of [LimitsConfig].
const (
	DefaultRedisTimeout     = 500 * time.Millisecond
	DefaultRedisBreakerOpen = time.Second
	// reservationMargin is added to the request timeout to make the
	// lifetime of a budget reservation on Redis.
	reservationMargin = time.Minute
)

// LimitsConfig sets how shared limits on Redis behave when Redis is slow
// or down. Rate limits (rpm) and budgets (token and cost blocks) have
// their own fail policy: money fails closed unless told otherwise.
type LimitsConfig struct {
	// RedisFail is the fail policy of budgets: "closed" (refuse 503 while
	// Redis is unreachable), "open" (admit, uncounted: a replica may
	// then sell past the budget) or "local" (admit on this replica's
	// share of the remaining budget, see [FailLocal]). If empty, closed.
	RedisFail string `json:"redis_fail,omitempty" yaml:"redis_fail,omitempty"`
	// RedisFailRate is the fail policy of rpm limits: "open" or "closed".
	// If empty, open.
	RedisFailRate string `json:"redis_fail_rate,omitempty" yaml:"redis_fail_rate,omitempty"`
	// RedisTimeout bounds each call to Redis; a slower call counts as
	// Redis being unreachable. If zero, 500ms.
	RedisTimeout Duration `json:"redis_timeout,omitempty" yaml:"redis_timeout,omitempty"`
	// RedisBreakerOpen is how long after a failed call every call fails
	// at once (per the fail policies) before one call probes Redis again:
	// while Redis is down a request pays RedisTimeout at most once per
	// this period. If zero, 1s.
	RedisBreakerOpen Duration `json:"redis_breaker_open,omitempty" yaml:"redis_breaker_open,omitempty"`
}

// parseFail reads a fail policy; local is accepted only when budget is
// set (redis_fail).
func parseFail(what, v, def string, budget bool) (string, error) {
	switch s := strings.ToLower(v); s {
	case "":
		return def, nil
	case FailOpen, FailClosed:
		return s, nil
	case FailLocal:
		if budget {
			return s, nil
		}
	}
	if budget {
		return "", fmt.Errorf("server: limits.%s %q: want open, closed or local", what, v)
	}
	return "", fmt.Errorf("server: limits.%s %q: want open or closed", what, v)
}

func (c LimitsConfig) validate() error {
	if _, err := parseFail("redis_fail", c.RedisFail, FailClosed, true); err != nil {
		return err
	}
	if _, err := parseFail("redis_fail_rate", c.RedisFailRate, FailOpen, false); err != nil {
		return err
	}
	if c.RedisTimeout < 0 || c.RedisBreakerOpen < 0 {
		return fmt.Errorf("server: limits.redis_timeout and limits.redis_breaker_open must not be negative")
	}
	return nil
}

// redisConfig returns the limit backend's configuration for c, with
// reservations held for the request timeout plus a margin.
func (c LimitsConfig) redisConfig(requestTimeout time.Duration) limit.RedisConfig {
	budget, _ := parseFail("redis_fail", c.RedisFail, FailClosed, true)
	rate, _ := parseFail("redis_fail_rate", c.RedisFailRate, FailOpen, false)
	rc := limit.RedisConfig{
		Timeout:          time.Duration(c.RedisTimeout),
		BreakerOpen:      time.Duration(c.RedisBreakerOpen),
		FailClosedBudget: budget != FailOpen,
		FailLocalBudget:  budget == FailLocal,
		FailClosedRate:   rate == FailClosed,
		ReservationTTL:   requestTimeout + reservationMargin,
	}
	if rc.Timeout == 0 {
		rc.Timeout = DefaultRedisTimeout
	}
	if rc.BreakerOpen == 0 {
		rc.BreakerOpen = DefaultRedisBreakerOpen
	}
	return rc
}

// build makes the limiter, on Redis when rdb is set (its counters seeded
// from the usage records when Redis holds none) or in process (seeded
// from the usage records now), and the budgets on it. Its log, store,
// clock and metrics must be set.
func (k *counters) build(ctx context.Context, cfg Config, rdb *redis.Client) error {
	k.limitsCfg = cfg.Limits
	if rdb == nil {
		local, err := limit.NewLocal(limit.LocalConfig{})
		if err != nil {
			return err
		}
		k.limiter = k.timeAdmission(local)
		k.budgets = k.newBudgets()
		return k.seedCounters(ctx)
	}
	rc := cfg.Limits.redisConfig(time.Duration(cfg.UpstreamTimeout))
	rc.Logger = k.log
	rc.RequireSeed = true
	k.seedKick = make(chan struct{}, 1)
	rc.OnUnseeded = func() {
		select {
		case k.seedKick <- struct{}{}:
		default:
		}
	}
	rl, err := limit.NewRedis(rdb, rc)
	if err != nil {
		return err
	}
	k.limiter, k.redis = k.timeAdmission(rl), rl
	k.budgets = k.newBudgets()
	k.registerRedisMetrics(rl)
	k.seedRedis(ctx, rl)
	return nil
}

// redisDegraded describes a Redis limiter that is following its fail
// policies, for /readyz; "" when Redis answers (or is not used).
func (k *counters) redisDegraded() string {
	r := k.redis
	if r == nil || !r.Down() {
		return ""
	}
	rc := k.limitsCfg.redisConfig(0)
	pol := func(closed bool) string {
		if closed {
			return "fail closed"
		}
		return "fail open"
	}
	budgets := pol(rc.FailClosedBudget)
	if rc.FailLocalBudget {
		budgets = fmt.Sprintf("on a local share (1/%d of the room left)", r.Replicas())
	}
	return "redis unreachable: rate limits " + pol(rc.FailClosedRate) + ", budgets " + budgets
}

// errLimitsUnavailable is the refusal of a fail-closed kind of limit while
// Redis is unreachable: 503, retry after a second.
func errLimitsUnavailable(kind string) error {
	return &httpx.Error{Status: http.StatusServiceUnavailable, Code: httpx.CodeUnavailable, RetryAfter: time.Second,
		Message: kind + " cannot be checked: the shared limit store (Redis) is unreachable and " + kind + " fail closed; retry after 1 s"}
}

// registerRedisMetrics exports the state of the Redis limiter r.
func (k *counters) registerRedisMetrics(r *limit.Redis) {
	k.metrics.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "keypool_limit_redis_down",
			Help: "1 while the last call to Redis for limits failed (limits follow their fail policies), else 0.",
		}, func() float64 {
			if r.Down() {
				return 1
			}
			return 0
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "keypool_limit_redis_failures_total",
			Help: "Calls to Redis for limits that failed or were refused at once by the open circuit breaker.",
		}, func() float64 { return float64(r.Failures()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "keypool_budget_charge_failures_total",
			Help: "Settlements and charges of finished requests that the budget counters (Redis) did not take at once; settlements are queued and replayed when Redis is back.",
		}, func() float64 { return float64(k.charges.failures.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "keypool_limit_redis_replicas",
			Help: "Live replicas counted by this one's heartbeat on Redis (limits.redis_fail: local divides the remaining budgets by it); 1 without the local policy.",
		}, func() float64 { return float64(r.Replicas()) }),
	)
}

// chargeLog logs failed budget charges (settlements of finished requests
// while Redis is unreachable) once per outage: a warning when they start
// failing and, at the first success after a second without failures, one
// line with the count, instead of a line per request.
type chargeLog struct {
	failing  atomic.Bool
	failures atomic.Uint64
	lastFail atomic.Int64 // Unix ns of the last failure
	mu       sync.Mutex   // serialises the two lines
	since    time.Time
	base     uint64 // failures when the outage started
}

// chargeQuiet is how long charges must not fail for an outage to end.
const chargeQuiet = time.Second

// budgetCharged records the outcome of one settle or charge (op) on the
// budget counters.
func (k *counters) budgetCharged(op string, err error) {
	k.charges.record(k.log, op, err)
}

func (c *chargeLog) record(log *slog.Logger, op string, err error) {
	now := time.Now()
	if err == nil {
		if !c.failing.Load() || now.Sub(time.Unix(0, c.lastFail.Load())) < chargeQuiet {
			return
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.failing.CompareAndSwap(true, false) {
			log.Info("budget charges succeed again", "failed", c.failures.Load()-c.base,
				"for", now.Sub(c.since).Round(time.Millisecond).String())
		}
		return
	}
	n := c.failures.Add(1)
	c.lastFail.Store(now.UnixNano())
	if c.failing.Load() {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failing.CompareAndSwap(false, true) {
		c.since, c.base = now, n-1
		log.Warn("budget charges failing (Redis unreachable): settlements of budgeted requests are queued and replayed when it answers; logged once until charges succeed, counted in keypool_budget_charge_failures_total",
			"op", op, "err", err)
	}
}

// seedRedis seeds the budget counters on Redis from the store's usage
// records when Redis holds none (new, flushed or restarted empty), once
// across replicas (see [limit.Redis.ClaimSeed]). It reports whether Redis
// is seeded now.
func (k *counters) seedRedis(ctx context.Context, r *limit.Redis) bool {
	start := time.Now()
	seed, done, err := r.ClaimSeed(ctx)
	switch {
	case err != nil:
		return false
	case !seed:
		return true
	}
	if err := k.seedCounters(ctx); err != nil {
		k.log.Warn("cannot seed budget counters on redis from the usage records; budgets fail per limits.redis_fail until it works", "err", err)
		return false
	}
	if err := done(ctx); err != nil {
		return false
	}
	k.log.Info("budget counters on redis seeded from the usage records", "took", time.Since(start).Round(time.Millisecond).String())
	return true
}

// watchSeed re-seeds Redis when a request finds it unseeded (kick) or a
// seed is still owed (retried every 100 ms: requests wait for it), until
// ctx ends.
func (k *counters) watchSeed(ctx context.Context, r *limit.Redis) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	owed := !k.seedRedis(ctx, r)
	for {
		select {
		case <-ctx.Done():
			return
		case <-k.seedKick:
			owed = true
		case <-t.C:
		}
		if owed {
			owed = !k.seedRedis(ctx, r)
		}
	}
}

// redisLog is the logger go-redis's own lines go to (see routeRedisLog).
var (
	redisLog     atomic.Pointer[slog.Logger]
	redisLogOnce sync.Once
)

// redisLogger sends go-redis's own log lines (one per failed dial while
// Redis is down, several a second) to the server's logger at debug level:
// the outage itself is reported once by the limiter.
type redisLogger struct{}

// Printf implements go-redis's logging interface.
func (redisLogger) Printf(ctx context.Context, format string, v ...any) {
	if l := redisLog.Load(); l != nil && l.Enabled(ctx, slog.LevelDebug) {
		l.DebugContext(ctx, "redis: "+fmt.Sprintf(format, v...))
	}
}

// routeRedisLog makes log the destination of go-redis's log lines (a
// process-wide setting: the last server made wins).
func routeRedisLog(log *slog.Logger) {
	redisLog.Store(log)
	redisLogOnce.Do(func() { redis.SetLogger(redisLogger{}) })
}

// timedBackend is a limit backend whose budget admissions are timed
// (keypool_budget_admission_seconds).
type timedBackend struct {
	limit.Backend
	h prometheus.Histogram
}

// ReserveAll implements [limit.Admitter], timed.
func (t timedBackend) ReserveAll(ctx context.Context, charges []limit.Charge, res []limit.Reservation, ds []limit.Decision, now time.Time) (int, error) {
	start := time.Now()
	which, err := t.Backend.ReserveAll(ctx, charges, res, ds, now)
	t.h.Observe(time.Since(start).Seconds())
	return which, err
}

// timeAdmission wraps b so that its budget admissions are timed.
func (k *counters) timeAdmission(b limit.Backend) limit.Backend {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "keypool_budget_admission_seconds",
		Help:    "Time to admit a metered request against its budgets (one Lua script on Redis, or the local counters), refusals included.",
		Buckets: []float64{.0001, .00025, .0005, .001, .002, .003, .005, .0075, .01, .02, .05, .1, .25, .5, 1},
	})
	k.metrics.reg.MustRegister(h)
	return timedBackend{b, h}
}
