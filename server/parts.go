package server

import (
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/keypool/keypool/admin"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/budget"
	"github.com/keypool/keypool/console"
	"github.com/keypool/keypool/limit"
	"github.com/keypool/keypool/meter"
	"github.com/keypool/keypool/sso"
	"github.com/keypool/keypool/store"
)

// The parts a [Server] is assembled from, beside the packages it wires
// (keypool, store, proxy, route, keystate, budget, limit, auth, admin,
// console, sso). Each part owns its state; [New] builds them and the
// Server's methods wire them to each other.

// gate is the client side of authentication: the token cache, the
// failure limiter, the sync of cache invalidations between replicas, the
// client address rules and the open calls a revocation ends.
type gate struct {
	auth     *auth.Authenticator
	fails    *auth.FailureLimiter
	authSync *authSync // invalidations to and from other replicas
	clients  clientIPs
	open     openCalls
}

// consoles is what serves people rather than API clients: the admin API,
// the console and its sessions, and OIDC sign-in.
type consoles struct {
	admin   *admin.API
	sess    *auth.Sessions
	console *console.Handler // nil when disabled
	sso     *sso.Handler     // nil without OIDC sign-in
}

// catalog is what the server keeps per service beside the pool: client
// limits, metering family, prices and budget scope (see svcMeta), read
// from the store at each reload.
type catalog struct {
	log        *slog.Logger
	svcMeta    atomic.Pointer[map[string]*svcMeta]
	basePrices *meter.PriceTable // shipped table merged with Config.PricesFile
}

// counters is the client limits part: the limiter (in process or on
// Redis) and the budgets counted on it, with the Redis seeding and the
// outage log of failed charges.
type counters struct {
	log       *slog.Logger
	st        budget.UsageQuerier // usage records, to seed the counters
	now       func() time.Time
	metrics   *metrics
	limitsCfg LimitsConfig

	limiter  limit.Backend
	redis    *limit.Redis  // the limiter's Redis backend; nil without Redis
	seedKick chan struct{} // asks watchSeed to seed the counters on Redis
	budgets  *budget.Budgets
	charges  chargeLog
}

// records is where finished requests go: the usage writer and, unless
// disabled, the journal that keeps records the store has not taken yet.
type records struct {
	usage   *store.UsageWriter
	journal *store.Journal // nil when disabled
	// st and log are where replayJournals replays orphaned journals and
	// says so.
	st  store.UsageAppender
	log *slog.Logger
}

// logs is the server's own log output when it made its logger (not with
// Config.Logger): a buffer flushed in the background.
type logs struct {
	logBuf *logBuffer // nil when Config.Logger was given
	// accessJSON reports whether access lines are written by hand into
	// logBuf: the server's own JSON logger.
	accessJSON bool
	logStop    func()        // stops the log flusher
	logDone    chan struct{} // closed when the log flusher has stopped
}
