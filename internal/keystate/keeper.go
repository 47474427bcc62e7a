// Package keystate carries a key's state beyond the pool that decided it.
// One [Keeper] owns the three ways it travels: the lasting states (a key
// found invalid, or spent with no known reset) are written to the store;
// every change is shared with the other replicas through Redis pub/sub,
// and the changes other replicas publish are applied to the pool; and a
// finished request's spend is charged to the key that served it.
//
// keypoold's server builds one Keeper, hands [Keeper.Observe] to the pool
// as its OnEvent hook, calls [Keeper.Start] once the pool is loaded and
// [Keeper.Close] when it stops. A Keeper is safe for concurrent use.
package keystate

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/external"
)

// StatusWriter is what a Keeper needs of the store: a key's lasting
// status ([store.StatusInvalid] or [store.StatusExhausted]) and reason.
type StatusWriter interface {
	SetKeyStatus(ctx context.Context, id, status, reason string) error
}

// Config configures a [Keeper].
type Config struct {
	// Store receives the lasting states. Required.
	Store StatusWriter
	// Logger logs persisted states and failures. If nil, slog.Default().
	Logger *slog.Logger
	// OnEvent, if set, is called with every change decided here (not
	// those applied from other replicas), on the request path: it must
	// not block.
	OnEvent func(keypool.Event)
	// OnDropped, if set, is called with a lasting change that was not
	// persisted because the queue was full.
	OnDropped func(keypool.Event)
	// QueueSize bounds the lasting changes waiting for the store. If
	// zero, 4096.
	QueueSize int
}

// Keeper persists, shares and charges key state for one pool. Create it
// with [New]; it must not be copied.
type Keeper struct {
	pool      *keypool.Pool
	st        StatusWriter
	log       *slog.Logger
	onEvent   func(keypool.Event)
	onDropped func(keypool.Event)
	queue     chan keypool.Event
	share     atomic.Pointer[sharer] // nil until Share
	wg        sync.WaitGroup
}

// New returns a Keeper for pool. Hand its Observe to the pool as OnEvent
// (the pool is created first, with a hook that calls Observe).
func New(pool *keypool.Pool, cfg Config) *Keeper {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = 4096
	}
	return &Keeper{pool: pool, st: cfg.Store, log: cfg.Logger, onEvent: cfg.OnEvent, onDropped: cfg.OnDropped,
		queue: make(chan keypool.Event, cfg.QueueSize)}
}

// Share makes the Keeper share key state with the other replicas through
// rdb (see the sharing notes in share.go). Call it before [Keeper.Start];
// without it, state stays in this process and the store.
func (k *Keeper) Share(rdb *redis.Client) {
	k.share.Store(newSharer(rdb, k.pool, k.log))
}

// Observe is the pool's OnEvent hook. It runs on the request path, so it
// only counts and queues: the store and Redis are written by the
// goroutines [Keeper.Start] starts.
func (k *Keeper) Observe(e keypool.Event) {
	if e.Remote {
		// Applied from another replica: that replica counted, shared and
		// persisted it; sharing it again would echo it back.
		return
	}
	if k.onEvent != nil {
		k.onEvent(e)
	}
	if sh := k.share.Load(); sh != nil {
		sh.offer(e)
	}
	if !persistent(e) {
		return
	}
	select {
	case k.queue <- e:
	default:
		if k.onDropped != nil {
			k.onDropped(e)
		}
		k.log.Warn("key state change not persisted: queue full", "service", e.Service, "key_id", e.KeyID, "state", e.State.String())
	}
}

// Start starts writing queued changes to the store and, after
// [Keeper.Share], sharing them, until ctx ends. With sharing it returns
// once subscribed to the other replicas (or after 5 s of trying) and
// having applied the timed states they recorded.
func (k *Keeper) Start(ctx context.Context) {
	k.wg.Go(func() { k.persistQueued(ctx) })
	if sh := k.share.Load(); sh != nil {
		subscribed := make(chan struct{})
		k.wg.Go(func() { sh.subscribe(ctx, subscribed) })
		k.wg.Go(func() { sh.publish(ctx) })
		<-subscribed
	}
}

// Close waits for the goroutines of [Keeper.Start] (end its context
// first), then writes the changes still queued, each within ctx and at
// most 10 s.
func (k *Keeper) Close(ctx context.Context) {
	k.wg.Wait()
	for {
		select {
		case e := <-k.queue:
			k.persist(ctx, e)
		default:
			return
		}
	}
}

// Charge deducts a finished request's metered spend from the serving
// key's balance, in the key's balance unit: USD for "usd", tokens for
// "tokens", one per successful request for "requests", and returns it.
// The pool learns it at once (a spent key turns exhausted, an event the
// Keeper persists and shares); the store gets it with the request's usage
// record (its KeySpend), in the same transaction as the record and only
// once per record, so balance_used follows the records, also after a
// crash and a journal replay.
func (k *Keeper) Charge(service, keyID, unit string, status int, tokens, cost float64) float64 {
	var amt float64
	switch strings.ToLower(unit) {
	case "usd", "$", "dollars":
		amt = cost
	case "tokens", "token":
		amt = tokens
	case "requests", "request", "calls":
		if status >= 200 && status < 300 {
			amt = 1
		}
	}
	if amt <= 0 {
		return 0
	}
	k.pool.Spend(service, keyID, amt)
	return amt
}

// persistent reports whether a state change must survive a restart: a key
// found invalid, or exhausted with no known reset. Transient states
// (cooling, breaker open) live in the pool only. Keys of an external
// credential table are read only: their owner decides.
func persistent(e keypool.Event) bool {
	if strings.HasPrefix(e.KeyID, external.KeyIDPrefix) {
		return false
	}
	return e.State == keypool.StateInvalid || (e.State == keypool.StateExhausted && e.Until.IsZero())
}

// persistQueued writes queued key state changes to the store until ctx
// ends.
func (k *Keeper) persistQueued(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case e := <-k.queue:
			k.persist(ctx, e)
		}
	}
}

func (k *Keeper) persist(ctx context.Context, e keypool.Event) {
	status := store.StatusInvalid
	if e.State == keypool.StateExhausted {
		status = store.StatusExhausted
	}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	err := k.st.SetKeyStatus(wctx, e.KeyID, status, e.Reason)
	switch {
	case err == nil:
		k.log.Info("key status persisted", "service", e.Service, "key_id", e.KeyID, "status", status, "reason", e.Reason)
	case errors.Is(err, store.ErrNotFound):
	default:
		k.log.Warn("persisting key status failed", "service", e.Service, "key_id", e.KeyID, "status", status, "err", err)
	}
}
