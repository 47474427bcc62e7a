package limit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// RedisConfig configures a [Redis] backend. The zero value is ready to use.
type RedisConfig struct {
	// Prefix is prepended to every Redis key this backend writes. If
	// empty, "keypool:limit:".
	Prefix string `json:"prefix,omitempty"`
	// Timeout bounds each call to Redis; a call that takes longer counts
	// as Redis being unreachable. If zero, 250ms.
	Timeout time.Duration `json:"timeout,omitempty"`
	// FailClosedRate makes Allow refuse (Degraded, RetryAfter 1s) while
	// Redis is unreachable. If false (the default), Allow admits.
	FailClosedRate bool `json:"fail_closed_rate,omitempty"`
	// FailClosedBudget makes Reserve refuse (Degraded, RetryAfter 1s)
	// while Redis is unreachable. If false (the default), Reserve admits
	// without recording a reservation.
	FailClosedBudget bool `json:"fail_closed_budget,omitempty"`
	// FailLocalBudget makes ReserveAll, while Redis is unreachable, admit
	// against this replica's share of each counter's remaining budget
	// (see [Redis.ReserveAll]); it takes precedence over FailClosedBudget
	// for ReserveAll. Reserve follows FailClosedBudget.
	FailLocalBudget bool `json:"fail_local_budget,omitempty"`
	// ReservationTTL is how long an unsettled reservation is held, so the
	// reservations of a replica that crashed are released. A later Settle
	// still charges its actual amount. Set it to the longest a request can
	// last plus a margin. If zero, 15 minutes.
	ReservationTTL time.Duration `json:"reservation_ttl,omitempty"`
	// BreakerOpen is how long, after a failed call, every call fails at
	// once (per the fail policies) before one call probes Redis again, so
	// that while Redis is down a request pays Timeout at most once per
	// BreakerOpen. If zero, 1s.
	BreakerOpen time.Duration `json:"breaker_open,omitempty"`
	// RequireSeed makes [Redis.ReserveAll] wait, at most SeedWait, while
	// Redis holds no epoch key, that is until a replica has seeded the
	// counters from the usage records ([Redis.ClaimSeed]), and then
	// refuse (Degraded, as when Redis is unreachable): a Redis restarted
	// empty never admits against counters that forgot the budget's
	// usage. OnUnseeded, if set, is called when a call finds Redis
	// unseeded, and when Redis answers again after an outage and holds
	// no epoch key (it must not block).
	RequireSeed bool   `json:"require_seed,omitempty"`
	OnUnseeded  func() `json:"-"`
	// SeedWait bounds how long ReserveAll waits for a seed (RequireSeed).
	// If zero, 5s.
	SeedWait time.Duration `json:"seed_wait,omitempty"`
	// Logger receives one warning when Redis becomes unreachable and one
	// info line when it is back. If nil, [slog.Default].
	Logger *slog.Logger `json:"-"`

	watchTick time.Duration // tests: the watcher's period, if not watchTick
}

// failRetry is the RetryAfter of a fail-closed refusal.
const failRetry = time.Second

// Redis is a [Backend] shared by every replica that uses the same Redis and
// Prefix. Each Allow, Reserve, ReserveAll, Settle and SettleAll is one
// atomic Lua script run (EVALSHA, one round trip); concurrent ReserveAll
// calls share one run per batch, and so do concurrent settlements (see
// [batcher]); now is passed to the
// script, Redis's own clock is not read, so replicas should keep their
// clocks in sync (NTP). Reservations live in two keys shared by every
// counter, so a Redis backend needs one Redis node (not Redis Cluster).
//
// Data per key: Allow keeps a sorted set of the admissions of the last
// minute (exact sliding-window log, expires a minute after the last
// admission); a Counter keeps one float per calendar window (expiring an
// hour after the window ends), a total, a hash of per-second amounts for
// the sliding minute and a hash of what its held reservations sum to and
// how many they are. A request's reservations on all its counters are one
// record (what each charge holds and on which counter, and which charges
// are settled), due at their expiry, or, once settled, when the settled
// marks may be forgotten (see resvLua): an admission writes one record
// per request, whatever its number of counters.
//
// When Redis cannot be reached within Timeout, admission follows the fail
// policy (default: admit) with Degraded set, and Settle, Add and Usage
// return an error wrapping [ErrUnavailable]; a warning is logged once per
// outage. Redis is safe for concurrent use; it runs one background
// goroutine (the watcher: breaker recovery, replay of queued settlements,
// heartbeat) until Close.
type Redis struct {
	c       redis.UniversalClient
	ping    func(context.Context) error // the watcher's PING (see pinger)
	cfg     RedisConfig
	log     *slog.Logger
	idBase  uint64
	nextID  atomic.Uint64
	br      breaker
	down    atomic.Bool // the breaker is open or half-open
	logged  atomic.Bool // this outage's warning is logged
	orph    orphans
	share   localShare
	seed    seedWaiter
	admits  batcher[admitCall]  // ReserveAll's batches
	settles batcher[settleCall] // SettleAll's batches

	ctx    context.Context // done when Close is called
	cancel context.CancelFunc
	wake   chan struct{} // a call succeeded: replay queued settlements now
	back   chan struct{} // the breaker closed: look for a restart-empty now
	done   chan struct{} // closed when the watcher has returned

	// traceAdmit, if set (tests), gets each batched admission's time in
	// the queue, its batch's script round trip (arguments built, sent,
	// run, reply read and replayed) and the time from the reply to the
	// caller running again.
	traceAdmit func(wait, script, wake time.Duration)

	failures atomic.Uint64 // calls failed or refused by the breaker
	released atomic.Uint64 // orphan reservations released
}

// NewRedis returns a [Redis] backend on client c, configured by cfg. For
// Timeout to bound socket I/O as well as waiting, c should have
// ContextTimeoutEnabled set; [NewRedisClient] does.
func NewRedis(c redis.UniversalClient, cfg RedisConfig) (*Redis, error) {
	if c == nil || cfg.Timeout < 0 || cfg.ReservationTTL < 0 || cfg.BreakerOpen < 0 {
		return nil, errors.New("limit: invalid RedisConfig or nil client")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "keypool:limit:"
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 250 * time.Millisecond
	}
	if cfg.ReservationTTL == 0 {
		cfg.ReservationTTL = 15 * time.Minute
	}
	if cfg.BreakerOpen == 0 {
		cfg.BreakerOpen = time.Second
	}
	if cfg.SeedWait <= 0 {
		cfg.SeedWait = 5 * time.Second
	}
	tick := cfg.watchTick
	if tick <= 0 {
		tick = watchTick
	}
	r := &Redis{c: c, cfg: cfg, log: cfg.Logger, idBase: rand.Uint64(),
		wake: make(chan struct{}, 1), back: make(chan struct{}, 1), done: make(chan struct{})}
	r.admits = batcher[admitCall]{run: r.admitBatch, full: admitFull, inFlight: maxAdmitInFlight}
	r.settles = batcher[settleCall]{run: r.settleBatch, full: settleFull}
	r.br.onOpen = r.breakerChanged
	r.br.reset(cfg.BreakerOpen)
	r.share.init()
	r.ping = pinger(c)
	r.ctx, r.cancel = context.WithCancel(context.Background())
	if r.log == nil {
		r.log = slog.Default()
	}
	go r.watch(tick)
	return r, nil
}

// DefaultPoolSize is the connection pool size of [NewRedisClient] when
// the URL sets no pool_size: enough for a proxy with hundreds of requests
// in flight not to queue for a connection (go-redis's default is 10 per
// CPU).
const DefaultPoolSize = 256

// NewRedisClient returns a go-redis client for url (redis://host:port/db
// or rediss://…) with ContextTimeoutEnabled set, so that a [Redis]
// backend's Timeout bounds every call, a 1s dial timeout unless url sets
// one (dial_timeout=) and [DefaultPoolSize] connections unless url sets
// pool_size=, a single dial attempt per call, and retries without
// back-off unless url sets min_retry_backoff=.
func NewRedisClient(url string) (*redis.Client, error) {
	o, err := redis.ParseURL(url)
	if err != nil {
		// The parse error can quote the URL, password included.
		return nil, errors.New("limit: redis url is malformed (want redis://[user:password@]host:port/db)")
	}
	o.ContextTimeoutEnabled = true
	if o.PoolSize == 0 { // no pool_size in url
		o.PoolSize = DefaultPoolSize
	}
	if o.DialTimeout == 0 { // not set in url
		o.DialTimeout = time.Second
	}
	// One dial attempt per call: the backend's breaker decides when to
	// try again (go-redis's 5 attempts 100 ms apart would make every call
	// during an outage wait out its Timeout).
	o.DialerRetries = 1
	// Retries without back-off unless url sets min_retry_backoff: a
	// retry is for a pooled connection a Redis restart closed, and is
	// worth making at once; go-redis's 10–1 000 ms back-off made the one
	// call that probes a down Redis for the breaker (and the calls waiting
	// for it) take ~100 ms to learn what the refused dial said at once.
	if o.MinRetryBackoff == 0 {
		o.MinRetryBackoff = -1
	}
	return redis.NewClient(o), nil
}

// pinger returns how the watcher PINGs Redis while the breaker is open:
// when c is a [redis.Client], through a fresh one-connection client each
// time, so that the probe neither waits behind c's pool nor inherits the
// dial back-off of a pool whose dials failed (go-redis then fails fast
// until its own redial, up to a second later, succeeds); else through c.
func pinger(c redis.UniversalClient) func(context.Context) error {
	rc, ok := c.(*redis.Client)
	if !ok {
		return func(ctx context.Context) error { return c.Ping(ctx).Err() }
	}
	o := *rc.Options()
	o.PoolSize, o.MinIdleConns, o.MaxIdleConns, o.DialerRetries = 1, 0, 0, 1
	return func(ctx context.Context) error {
		p := redis.NewClient(&o)
		defer p.Close()
		return p.Ping(ctx).Err()
	}
}

func (r *Redis) rateKey(key string) string {
	return r.cfg.Prefix + "{" + key + "}:rpm"
}

// counterKeys returns a counter's keys: its hour, day, month and total
// sums, its minute hash and its reserved hash (see resvLua).
func (r *Redis) counterKeys(key string, now time.Time) []string {
	return r.appendCounterKeys(nil, key, now)
}

// appendCounterKeys appends counterKeys(key, now) to keys.
func (r *Redis) appendCounterKeys(keys []string, key string, now time.Time) []string {
	base := r.cfg.Prefix + "{" + key + "}:"
	return append(keys,
		base+"h:"+strconv.FormatInt(calStart(Hour, now), 10),
		base+"d:"+strconv.FormatInt(calStart(Day, now), 10),
		base+"m:"+strconv.FormatInt(calStart(Month, now), 10),
		base+"t",
		base+"s",
		base+"ru",
	)
}

// dueKey and recordsKey are the due set and the records hash of the
// reservations (see resvLua).
func (r *Redis) dueKey() string     { return r.cfg.Prefix + "resv" }
func (r *Redis) recordsKey() string { return r.cfg.Prefix + "resh" }

func (r *Redis) id() string {
	return strconv.FormatUint(r.newID(), 36)
}

// newID returns an id no other call of this replica (and, but for a
// 2^-64 chance, of another) has: a request's reservations record.
func (r *Redis) newID() uint64 { return r.idBase + r.nextID.Add(1) }

// failed sorts out an error from Redis: the caller's own cancellation is
// returned as is; anything else is counted and returned wrapped in
// ErrUnavailable. The first failure after the breaker opened logs the
// outage's one warning.
func (r *Redis) failed(parent context.Context, op string, err error) error {
	if perr := parent.Err(); perr != nil {
		return perr
	}
	r.failures.Add(1)
	if r.down.Load() && r.logged.CompareAndSwap(false, true) {
		r.log.Warn("limit: redis unreachable, applying fail policy",
			"op", op, "err", err,
			"fail_closed_rate", r.cfg.FailClosedRate, "fail_closed_budget", r.cfg.FailClosedBudget)
	}
	return fmt.Errorf("%w: %s: %w", ErrUnavailable, op, err)
}

// breakerChanged follows the breaker: Redis is down from when it opens
// until it closes (a half-open probe that succeeds, or the watcher's PING).
func (r *Redis) breakerChanged(open bool) {
	if open {
		r.down.Store(true)
		return
	}
	if r.down.CompareAndSwap(true, false) {
		r.share.reset()
		select {
		case r.back <- struct{}{}:
		default:
		}
		if r.logged.CompareAndSwap(true, false) {
			r.log.Info("limit: redis reachable again")
		}
	}
}

func (r *Redis) ok() {
	if r.orph.pending() {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
}

// Allow implements [Limiter] with an exact sliding-window log in Redis
// (microsecond resolution). It returns an error only when ctx is done.
func (r *Redis) Allow(ctx context.Context, key string, limit int, now time.Time) (Decision, error) {
	if limit <= 0 {
		return Decision{Allowed: true}, nil
	}
	lim := Limit{Window: Minute, Block: float64(limit)}
	us := now.UnixMicro()
	var res []int64
	err := r.run(ctx, "allow", func(cctx context.Context) error {
		var err error
		res, err = rateScript.Run(cctx, r.c, []string{r.rateKey(key)},
			us, RateWindow.Microseconds(), limit, strconv.FormatInt(us, 36)+"-"+r.id()).Int64Slice()
		if err == nil && len(res) != 3 {
			err = fmt.Errorf("unexpected reply %v", res)
		}
		return err
	})
	if err != nil {
		if errors.Is(err, ErrUnavailable) {
			if r.cfg.FailClosedRate {
				return Decision{Degraded: true, Limit: lim, RetryAfter: failRetry}, nil
			}
			return Decision{Allowed: true, Degraded: true, Limit: lim}, nil
		}
		return Decision{}, err
	}
	d := Decision{Allowed: res[0] == 1, Limit: lim, Used: float64(res[1])}
	if !d.Allowed {
		d.RetryAfter = time.Duration(res[2]) * time.Microsecond
	}
	return d, nil
}

// Reserve implements [Counter]. It returns an error for an invalid limit
// or amount, or when ctx is done.
func (r *Redis) Reserve(ctx context.Context, key string, amount float64, limits []Limit, now time.Time) (Reservation, Decision, error) {
	if err := validate(amount, limits); err != nil {
		return Reservation{}, Decision{}, err
	}
	res := Reservation{key: key, amount: amount, done: new(atomic.Bool)}
	member := ""
	if amount > 0 {
		member = strconv.FormatUint(r.newID(), 10)
	}
	args := make([]any, 0, 6+4*len(limits))
	args = append(args, now.UnixMilli(), now.Unix(), strconv.FormatFloat(amount, 'g', -1, 64), member, r.cfg.ReservationTTL.Milliseconds(), len(limits))
	for _, l := range limits {
		args = append(args, int(l.Window), l.Warn, l.Block, calRetry(l.Window, now).Milliseconds())
	}
	var d Decision
	err := r.run(ctx, "reserve", func(cctx context.Context) error {
		keys := append(r.counterKeys(key, now), r.dueKey(), r.recordsKey())
		out, err := reserveScript.Run(cctx, r.c, keys, args...).Slice()
		if err == nil {
			d, _, err = parseReserve(out, limits)
		}
		return err
	})
	if err != nil {
		if member != "" && !errors.Is(err, gobreaker.ErrOpenState) && !errors.Is(err, gobreaker.ErrTooManyRequests) {
			r.orph.add(orphan{key: key, member: member, held: amount, at: now})
		}
		if errors.Is(err, ErrUnavailable) {
			if r.cfg.FailClosedBudget {
				return Reservation{}, Decision{Degraded: true, RetryAfter: failRetry}, nil
			}
			return res, Decision{Allowed: true, Degraded: true}, nil
		}
		return Reservation{}, Decision{}, err
	}
	if !d.Allowed {
		return Reservation{}, d, nil
	}
	if amount > 0 {
		res.recorded = true
		res.member = member
	}
	return res, d, nil
}

// parseReserve reads check's reply (see admitLua): the decision and the
// room left under the tightest block (+Inf without one, never negative).
func parseReserve(out []any, limits []Limit) (Decision, float64, error) {
	if len(out) != 7 {
		return Decision{}, 0, fmt.Errorf("unexpected reply %v", out)
	}
	allowed, _ := out[0].(int64)
	warn, _ := out[1].(int64)
	idx, _ := out[2].(int64)
	usedS, _ := out[3].(string)
	retry, _ := out[4].(int64)
	resS, _ := out[5].(string)
	roomS, _ := out[6].(string)
	used, err := strconv.ParseFloat(usedS, 64)
	reserved, err2 := strconv.ParseFloat(resS, 64)
	room, err3 := strconv.ParseFloat(roomS, 64)
	if err != nil || err2 != nil || err3 != nil {
		return Decision{}, 0, fmt.Errorf("unexpected reply %v", out)
	}
	d := Decision{Allowed: allowed == 1, Warn: warn == 1, Used: used, Reserved: reserved, RetryAfter: time.Duration(retry) * time.Millisecond}
	if idx >= 1 && int(idx) <= len(limits) {
		d.Limit = limits[idx-1]
	}
	return d, max(room, 0), nil
}

// Settle implements [Counter].
func (r *Redis) Settle(ctx context.Context, res Reservation, actual float64, now time.Time) error {
	o, ok := r.settling(res, actual, now)
	if !ok {
		return nil
	}
	return r.charge(ctx, "settle", []orphan{o})
}

// Add implements [Counter].
func (r *Redis) Add(ctx context.Context, key string, amount float64, now time.Time) error {
	if amount < 0 || amount != amount {
		return fmt.Errorf("%w: amount %v", ErrInvalidLimit, amount)
	}
	if amount == 0 {
		return nil
	}
	return r.charge(ctx, "add", []orphan{{key: key, actual: amount, at: now}})
}

// Usage implements [Counter].
func (r *Redis) Usage(ctx context.Context, key string, w Window, now time.Time) (float64, error) {
	if !w.valid() {
		return 0, fmt.Errorf("%w: window %d", ErrInvalidLimit, uint8(w))
	}
	keys := r.counterKeys(key, now)
	if w != Minute {
		var v float64
		err := r.run(ctx, "usage", func(cctx context.Context) error {
			var err error
			v, err = r.c.Get(cctx, keys[w-Hour]).Float64()
			return err
		})
		if errors.Is(err, redis.Nil) {
			return 0, nil
		}
		if err != nil {
			return 0, err
		}
		return v, nil
	}
	var h map[string]string
	err := r.run(ctx, "usage", func(cctx context.Context) error {
		var err error
		h, err = r.c.HGetAll(cctx, keys[4]).Result()
		return err
	})
	if err != nil {
		return 0, err
	}
	sec := now.Unix()
	var u float64
	for f, v := range h {
		s, err1 := strconv.ParseInt(f, 10, 64)
		a, err2 := strconv.ParseFloat(v, 64)
		if err1 == nil && err2 == nil && s >= sec-60 && s <= sec {
			u += a
		}
	}
	return u, nil
}

var _ Backend = (*Redis)(nil)
