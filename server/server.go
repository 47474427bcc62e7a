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

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"reflect"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/admin"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/budget"
	"github.com/keypool/keypool/console"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/internal/keystate"
	"github.com/keypool/keypool/limit"
	"github.com/keypool/keypool/meter"
	"github.com/keypool/keypool/proxy"
	"github.com/keypool/keypool/route"
	"github.com/keypool/keypool/sso"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/external"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/sqlstore"
)

// Server is a keypoold server. Create it with [New]; serve it with
// [Server.Run] or [Server.Serve], or mount [Server.Handler] yourself; stop
// it with [Server.Shutdown]. It must not be copied.
type Server struct {
	cfg Config
	// ready logs "keypoold ready" once, when the first listener serves
	// (after the bind, so a port conflict never follows a ready line).
	ready   sync.Once
	log     *slog.Logger
	st      serverStore
	ext     *external.Source
	pool    *keypool.Pool
	syncer  *store.Syncer
	auth    *auth.Authenticator
	fails   *auth.FailureLimiter
	admin   *admin.API
	sess    *auth.Sessions
	console *console.Handler // nil when disabled
	sso     *sso.Handler     // nil without OIDC sign-in
	proxy   *proxy.Handler
	routes  *route.Handler // routers, in front of proxy
	limiter limit.Backend
	redis   *limit.Redis // the limiter's Redis backend; nil without Redis
	rdb     *redis.Client
	// seedKick asks watchSeed to seed the counters on Redis.
	seedKick chan struct{}
	// authSync carries auth invalidations to and from other replicas.
	authSync *authSync
	charges  chargeLog
	clients  clientIPs
	usage    *store.UsageWriter
	journal  *store.Journal // nil when disabled
	metrics  *metrics
	leases   *leaseBook
	keys     *keystate.Keeper // key state: persisted, shared, charged
	handler  http.Handler
	logBuf   *logBuffer // nil when Config.Logger was given
	// accessJSON reports whether access lines are written by hand into
	// logBuf: the server's own JSON logger.
	accessJSON bool
	logStop    func()        // stops the log flusher
	logDone    chan struct{} // closed when the log flusher has stopped

	svcMeta    atomic.Pointer[map[string]*svcMeta]
	basePrices *meter.PriceTable // shipped table merged with Config.PricesFile
	budgets    *budget.Budgets
	now        func() time.Time
	inflight   atomic.Int64
	draining   atomic.Bool
	hijacked   connSet
	onHijack   func(net.Conn) // onHijackConn, bound once
	open       openCalls

	bgCancel context.CancelFunc
	bg       sync.WaitGroup

	mu       sync.Mutex // protects httpSrvs
	httpSrvs []*http.Server

	shutdownOnce sync.Once
	shutdownErr  error
	done         chan struct{} // closed when Shutdown has finished
}

// serverStore is what the server needs of its store: records, and admin
// users with their sessions. Other capabilities are used when the store
// has them (see [New]).
type serverStore interface {
	store.Store
	store.AdminStore
}

// New opens the store, loads the pool and prepares every handler; it
// starts the background work (store sync, key state persistence, lease
// expiry, usage batching) but does not listen. See [Config] for the
// defaults of a zero Config. Call [Server.Shutdown] to release what it
// opened.
//
// A [Config.Store] must implement [store.AdminStore]; New uses what else
// it implements, as sqlstore's Store does: [store.Listener] (changes
// arrive without waiting for the poll), [store.TierStore] (tiers),
// [store.StatusCounter] (the console's overview), Probe(ctx) error
// (/readyz tells a read-only database apart; otherwise Ping),
// Rewrap(ctx) (int, error) (re-sealing after a key rotation) and
// NotifyAuth/ListenAuth (auth invalidations between replicas besides
// Redis).
func New(ctx context.Context, cfg Config) (*Server, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	out := cfg.Output
	if out == nil {
		out = os.Stderr
	}
	log := cfg.Logger
	var logBuf *logBuffer
	if log == nil {
		w := cfg.LogOutput
		if w == nil {
			w = os.Stderr
		}
		logBuf = newLogBuffer(w)
		var err error
		if log, err = newLogger(cfg, logBuf); err != nil {
			return nil, err
		}
	}
	generated, err := resolveSecrets(&cfg, out)
	if err != nil {
		return nil, err
	}
	if generated {
		log.Warn("using a generated encryption key stored beside the database; set KEYPOOL_ENCRYPTION_KEY for production",
			"file", EncryptionKeyFile, "data_dir", cfg.DataDir)
	}
	var keyring *seal.Keyring // nil with Config.Store, which seals its own
	if cfg.Store == nil {
		if keyring, err = seal.ParseKeyring(cfg.EncryptionKey.Reveal()); err != nil {
			return nil, fmt.Errorf("server: KEYPOOL_ENCRYPTION_KEY: %w", err)
		}
	}

	s := &Server{cfg: cfg, log: log, logBuf: logBuf, done: make(chan struct{}), now: cfg.Now}
	s.onHijack = s.onHijackConn
	s.accessJSON = logBuf != nil && !strings.EqualFold(cfg.LogFormat, "text")
	if s.now == nil {
		s.now = time.Now
	}
	if s.basePrices, err = loadPrices(cfg.PricesFile, log); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			_ = s.closeResources()
			if logBuf != nil {
				_ = logBuf.Flush()
			}
		}
	}()

	if err := s.openStore(ctx, keyring); err != nil {
		return nil, err
	}
	if err := applyTiers(ctx, s.st, cfg.Tiers, log); err != nil {
		return nil, err
	}
	if err := applyServices(ctx, s.st, cfg.Services, cfg.validator(), log); err != nil {
		return nil, err
	}
	if cfg.ExternalDatabase != "" {
		if s.ext, err = external.Open(ctx, cfg.ExternalDatabase.Reveal(), cfg.External); err != nil {
			return nil, fmt.Errorf("server: open external database %s: %w", cfg.ExternalDatabase, err)
		}
	} else if named := externalNamed(cfg); len(named) > 0 || !reflect.ValueOf(cfg.External).IsZero() {
		log.Warn("the config has an external: section or services with external_name, but no external database is set; "+
			"set KEYPOOL_EXTERNAL_DATABASE or -external-database (external keys are not loaded)", "services", named)
	}

	if !cfg.UsageJournal.Disabled {
		if err := s.openJournal(ctx); err != nil {
			return nil, err
		}
	}

	s.pool, err = keypool.New(keypool.Config{OnEvent: func(e keypool.Event) { s.keys.Observe(e) }, OnHold: s.onHold})
	if err != nil {
		return nil, err
	}
	s.metrics = newMetrics(s.pool, func() float64 {
		if s.usage == nil {
			return 0
		}
		return float64(s.usage.Dropped())
	})
	s.keys = keystate.New(s.pool, keystate.Config{Store: s.st, Logger: log, OnEvent: s.metrics.onEvent,
		OnDropped: func(keypool.Event) { s.metrics.eventsDropped.Inc() }})

	opts := store.SyncerOptions{Interval: time.Duration(cfg.SyncInterval), Logger: log, Registry: cfg.registry()}
	if l, ok := s.st.(store.Listener); ok {
		opts.Notify = l
	}
	if s.ext != nil {
		opts.External = s.ext
		if r := time.Duration(cfg.External.Refresh); r > 0 {
			opts.ExternalInterval = r
		}
	}
	s.syncer = store.NewSyncer(s.pool, s.st, opts)
	if err := s.syncer.Load(ctx); err != nil {
		return nil, fmt.Errorf("server: load services and keys: %w", err)
	}
	s.routes = new(route.Handler) // set up below, with the proxy
	if err := s.refreshServiceLimits(ctx); err != nil {
		return nil, err
	}

	s.auth = auth.New(s.st, auth.Config{AdminToken: cfg.AdminToken.Reveal(), CacheTTL: time.Duration(cfg.AuthCacheTTL),
		OnInvalidate: s.onInvalidate})
	s.fails = auth.NewFailureLimiter(auth.FailureConfig{})
	trusted, err := parsePrefixes(cfg.TrustedProxies)
	if err != nil {
		return nil, fmt.Errorf("server: trusted_proxies: %w", err)
	}
	s.clients = clientIPs{trusted: trusted}

	if cfg.RedisURL != "" {
		routeRedisLog(log)
		if s.rdb, err = limit.NewRedisClient(cfg.RedisURL.Reveal()); err != nil {
			return nil, fmt.Errorf("server: KEYPOOL_REDIS_URL %s: %w", cfg.RedisURL, err)
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		perr := s.rdb.Ping(pctx).Err()
		cancel()
		if perr != nil {
			// Not fatal: the Redis limiter follows its fail policies
			// and says so.
			log.Warn("redis unreachable at start; limits follow their fail policies until it answers", "redis", cfg.RedisURL, "err", perr)
		}
		rc := cfg.Limits.redisConfig(time.Duration(cfg.UpstreamTimeout))
		rc.Logger = log
		rc.RequireSeed = true
		s.seedKick = make(chan struct{}, 1)
		rc.OnUnseeded = func() {
			select {
			case s.seedKick <- struct{}{}:
			default:
			}
		}
		rl, err := limit.NewRedis(s.rdb, rc)
		if err != nil {
			return nil, err
		}
		s.limiter, s.redis = s.timeAdmission(rl), rl
		s.budgets = s.newBudgets()
		s.registerRedisMetrics(rl)
		s.seedRedis(ctx, rl)
		s.keys.Share(s.rdb)
	} else {
		local, err := limit.NewLocal(limit.LocalConfig{})
		if err != nil {
			return nil, err
		}
		s.limiter = s.timeAdmission(local)
		s.budgets = s.newBudgets()
		if err := s.seedCounters(ctx); err != nil {
			return nil, err
		}
	}

	notifier, _ := s.st.(authNotifier)
	s.authSync = newAuthSync(notifier, s.rdb, log)
	s.authSync.auth = s.auth

	uopts := cfg.Usage
	if uopts.Logger == nil {
		uopts.Logger = log
	}
	uopts.Journal = s.journal
	s.usage = store.NewUsageWriter(s.st, uopts)
	s.leases = newLeaseBook(time.Duration(cfg.LeaseTTL), s.now)

	if s.sess, err = auth.NewSessions(auth.SessionConfig{Store: s.st, TTL: time.Duration(cfg.Console.SessionTTL),
		Params: cfg.Console.Password, Now: s.now}); err != nil {
		return nil, err
	}
	if err := bootstrapAdmin(ctx, s.st, cfg.DataDir, cfg.Listen, cfg.Console.Password, out); err != nil {
		return nil, err
	}
	if s.admin, err = admin.New(admin.Config{
		Store: s.st, Pool: s.pool, Auth: s.auth, Failures: s.fails,
		OnChange: s.onAdminChange, Logger: log, AllowMetadataUpstreams: cfg.AllowMetadataUpstreams, Registry: cfg.registry(),
		ClientIP: s.clients.of, Sessions: s.sess,
	}); err != nil {
		return nil, err
	}

	if !cfg.Console.Disabled {
		statuses, _ := s.st.(store.StatusCounter)
		if s.console, err = console.New(console.Config{API: s.admin, Sessions: s.sess, Statuses: statuses,
			Secure: s.cookieSecure, Logger: log, Now: s.now, SSOLogin: cfg.OIDC.Enabled() && (len(cfg.OIDC.Admins) > 0 || cfg.OIDC.AdminGroup != ""), SSOProvider: cfg.OIDC.DisplayName()}); err != nil {
			return nil, err
		}
	}
	if err := s.setupSSO(cfg); err != nil {
		return nil, err
	}

	upstream := cfg.Upstream
	if upstream == nil {
		upstream = upstreamTransport(cfg.AllowMetadataUpstreams)
	}
	s.proxy = &proxy.Handler{
		Pool: s.pool,
		Transport: &proxy.Transport{Base: upstream, OnAttempt: s.onAttempt, OnSend: s.onSend,
			AttemptTimeout: time.Duration(cfg.UpstreamHeaderTimeout)},
		IdleTimeout:    time.Duration(cfg.UpstreamIdleTimeout),
		Timeout:        time.Duration(cfg.UpstreamTimeout),
		Authorize:      s.authorize,
		Prepare:        s.prepare,
		MaxBodyBytes:   cfg.MaxBodyBytes,
		ModifyResponse: s.modifyResponse,
		OnDone:         s.onProxyDone,
		Logger:         log,
	}
	s.initRoutes()
	s.handler = s.observe(s.mux())

	bgctx, cancel := context.WithCancel(context.Background())
	s.bgCancel = cancel
	s.bg.Go(func() { _ = s.syncer.Run(bgctx) })
	s.bg.Go(func() { s.leases.run(bgctx) })
	s.bg.Go(func() { s.watchServiceLimits(bgctx) })
	s.bg.Go(func() { s.pruneAdmin(bgctx) })
	if s.sso != nil {
		s.bg.Go(func() { s.discoverSSO(bgctx) })
	}
	if s.journal != nil {
		s.bg.Go(func() { s.replayJournals(bgctx) })
	}
	if _, ok := s.st.(rewrapper); ok && keyring != nil && len(keyring.Versions()) > 1 {
		// A rotation: re-seal what older keys sealed, online.
		s.bg.Go(func() { s.rewrap(bgctx) })
	}
	if rl := s.redis; rl != nil {
		s.bg.Go(func() { s.watchSeed(bgctx, rl) })
	}
	s.bg.Go(func() { s.authSync.send(bgctx) })
	s.bg.Go(func() { s.authSync.listenPostgres(bgctx) })
	if s.rdb != nil {
		s.bg.Go(func() { s.authSync.listenRedis(bgctx) })
	}
	s.keys.Start(bgctx)
	if logBuf != nil {
		lctx, lcancel := context.WithCancel(context.Background())
		s.logStop = lcancel
		s.logDone = make(chan struct{})
		go func() { defer close(s.logDone); logBuf.run(lctx) }()
	}
	ok = true
	// Starting hashed the console password (argon2id: 19 MiB by
	// default) and read the store: hand that scratch memory back to the
	// OS now rather than carry it as resident memory while serving.
	debug.FreeOSMemory()
	return s, nil
}

// DefaultUpstream returns the transport keypoold uses to reach upstreams
// when [Config.Upstream] is nil: http.DefaultTransport's settings with
// room for many idle connections per upstream host. It refuses to connect
// to link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10,
// 100.100.100.200, fd00:ec2::254) whatever name resolved to them, so a
// service's base_url cannot reach instance credentials through DNS; set
// [Config.AllowMetadataUpstreams] to allow them.
func DefaultUpstream() *http.Transport { return upstreamTransport(false) }

func upstreamTransport(allowMetadata bool) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = 4096
	t.MaxIdleConnsPerHost = 1024
	t.IdleConnTimeout = 90 * time.Second
	d := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	if !allowMetadata {
		d.Control = refuseMetadata
	}
	t.DialContext = d.DialContext
	return t
}

// errMetadataAddress is the dial error for a refused address.
var errMetadataAddress = errors.New("refusing to connect to a link-local or cloud metadata address")

var metadataAddrs = []netip.Addr{netip.MustParseAddr("100.100.100.200"), netip.MustParseAddr("fd00:ec2::254")}

// refuseMetadata is a net.Dialer Control hook: it runs after name
// resolution and before the connection is made.
func refuseMetadata(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return err
	}
	ip = ip.Unmap()
	if ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || slices.Contains(metadataAddrs, ip) {
		return fmt.Errorf("%w (%s)", errMetadataAddress, ip)
	}
	return nil
}

// Handler returns the server's HTTP handler: every endpoint, wrapped with
// request ids and the access log.
func (s *Server) Handler() http.Handler { return s.handler }

// Pool returns the server's key pool.
func (s *Server) Pool() *keypool.Pool { return s.pool }

// Store returns the server's store.
func (s *Server) Store() store.Store { return s.st }

// Syncer returns the syncer that keeps the pool in step with the store.
func (s *Server) Syncer() *store.Syncer { return s.syncer }

// AdminToken returns the admin token in use (configured, read from the
// data directory, or generated).
func (s *Server) AdminToken() keypool.Secret { return s.cfg.AdminToken }

// Config returns the configuration in use, defaults and resolved secrets
// included.
func (s *Server) Config() Config { return s.cfg }

func (s *Server) mux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", s.healthz)
	mux.HandleFunc("/health", s.healthz)
	mux.HandleFunc("GET /services", s.listServices)
	mux.HandleFunc("/readyz", s.readyz)
	mux.Handle("/metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}))
	mux.HandleFunc("/v1/", s.serveV1)
	mux.Handle("/admin/", s.admin)
	mux.Handle("/admin", s.admin)
	mux.HandleFunc("/key", s.leaseKey)
	mux.HandleFunc("/key/{id}/report", s.reportKey)
	if s.sso != nil {
		mux.Handle("/auth/", s.sso)
	}
	if s.console != nil {
		mux.Handle(console.Prefix, s.console)
		mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, console.Prefix, http.StatusFound)
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, httpx.Errorf(http.StatusNotFound, httpx.CodeNotFound, "no endpoint %s; the proxy serves /v1/{service}/...", safePath(r.URL.Path)))
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Proxy paths bypass ServeMux, which would answer a path with dot
		// or empty segments with a redirect to its cleaned form: the
		// proxy refuses those with a 400 JSON error, as it does their
		// encoded forms.
		if strings.HasPrefix(r.URL.Path, "/v1/") {
			s.serveV1(w, r)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// Run listens on [Config.Listen] and serves until ctx is done, then shuts
// down gracefully (see [Server.Shutdown]) and returns nil. It returns an
// error when it cannot listen or serving fails.
func (s *Server) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		_ = s.Shutdown(context.Background())
		return fmt.Errorf("server: listen: %w", err)
	}
	return s.Serve(ctx, ln)
}

// Serve serves on ln until ctx is done, then shuts down gracefully and
// returns nil (or Shutdown's error). It returns serving errors other than
// a shutdown.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.mu.Lock()
	s.httpSrvs = append(s.httpSrvs, hs)
	s.mu.Unlock()
	s.log.Info("listening", "addr", ln.Addr().String())
	s.ready.Do(func() {
		s.log.Info("keypoold ready", "addr", ln.Addr().String(), "database", s.cfg.Database,
			"services", len(s.pool.Services()), "redis", s.cfg.RedisURL != "", "external", s.cfg.ExternalDatabase != "")
	})
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			<-s.done // someone else called Shutdown: wait for it
			return s.shutdownErr
		}
		_ = s.Shutdown(context.Background())
		return fmt.Errorf("server: serve: %w", err)
	case <-ctx.Done():
		err := s.Shutdown(context.Background())
		<-errc
		return err
	}
}

// Shutdown stops the server gracefully: listeners close at once; requests
// in flight get up to [Config.DrainTimeout] (or until ctx is done) to
// finish, after which their connections are closed; hijacked connections
// (WebSockets) are closed; background work stops; pending usage records
// and key state changes are written; the store is closed. It may be called
// more than once and from several goroutines; every call waits for the
// first to finish and returns its result.
func (s *Server) Shutdown(ctx context.Context) error {
	s.shutdownOnce.Do(func() {
		defer close(s.done)
		s.shutdownErr = s.shutdown(ctx)
	})
	<-s.done
	return s.shutdownErr
}

func (s *Server) shutdown(ctx context.Context) error {
	start := time.Now()
	s.draining.Store(true)
	s.log.Info("shutting down: draining in-flight requests", "in_flight", s.inflight.Load(), "drain_timeout", time.Duration(s.cfg.DrainTimeout).String())
	dctx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.DrainTimeout))
	defer cancel()
	s.mu.Lock()
	srvs := s.httpSrvs
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, hs := range srvs {
		wg.Go(func() {
			if err := hs.Shutdown(dctx); err != nil {
				s.log.Warn("drain timeout reached; closing remaining connections", "err", err)
				_ = hs.Close()
			}
		})
	}
	wg.Wait()
	if n := s.closeHijacked(); n > 0 {
		s.log.Info("closed upgraded connections", "count", n)
	}
	// Wait (briefly) for the handlers of closed connections to return, so
	// their usage records are written below.
	for deadline := time.Now().Add(5 * time.Second); s.inflight.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}

	s.bgCancel()
	_ = s.syncer.Close()
	s.bg.Wait()
	s.leases.releaseAll()

	var errs []error
	fctx, fcancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer fcancel()
	if err := s.usage.Close(fctx); err != nil {
		errs = append(errs, err)
	}
	if s.journal != nil {
		// Records the store did not take stay in the journal for the
		// next start.
		if err := s.journal.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	s.keys.Close(fctx) // writes the key states still queued
	errs = append(errs, s.closeResources())
	err := errors.Join(errs...)
	s.log.Info("shutdown complete", "took", time.Since(start).Round(time.Millisecond).String(),
		"usage_written", s.usage.Written(), "usage_dropped", s.usage.Dropped(), "error", errString(err))
	if s.logStop != nil {
		s.logStop()
		<-s.logDone
	}
	return err
}

// closeResources closes what New opened (safe on a partly built Server).
func (s *Server) closeResources() error {
	var errs []error
	if s.limiter != nil {
		errs = append(errs, s.limiter.Close())
	}
	if s.journal != nil {
		if err := s.journal.Close(); !errors.Is(err, store.ErrJournalClosed) {
			errs = append(errs, err)
		}
	}
	if s.rdb != nil {
		errs = append(errs, s.rdb.Close())
	}
	if s.ext != nil {
		errs = append(errs, s.ext.Close())
	}
	if s.st != nil {
		errs = append(errs, s.st.Close())
	}
	return errors.Join(errs...)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// Reload reads services, keys and service settings (limits, metering
// family, prices) from the store now, for a caller that wrote to
// [Server.Store] directly; admin API writes reload by themselves, and
// other changes are picked up within [Config.SyncInterval].
func (s *Server) Reload(ctx context.Context) error {
	if err := s.syncer.Sync(ctx); err != nil {
		return err
	}
	return s.refreshServiceLimits(ctx)
}

// onAdminChange reloads the pool at once after an admin write, so the
// next request sees the change.
func (s *Server) onAdminChange() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.syncer.Sync(ctx); err != nil {
		s.log.Warn("reload after admin change failed; the periodic sync will retry", "err", err)
		s.syncer.Trigger()
	}
	if err := s.refreshServiceLimits(ctx); err != nil {
		s.log.Warn("reading service limits failed", "err", err)
	}
	s.budgets.Clear()
	s.sweepKeys()
}

// refreshServiceLimits reads each service's client limits, metering
// family and prices.
func (s *Server) refreshServiceLimits(ctx context.Context) error {
	svcs, err := s.st.Services(ctx)
	if err != nil {
		return fmt.Errorf("server: read services: %w", err)
	}
	m := s.buildMeta(svcs)
	s.svcMeta.Store(&m)
	s.setRouters(svcs)
	for _, sv := range svcs {
		s.metrics.service(sv.Name) // its zero series, from the start
		stats, _ := s.pool.Stats(sv.Name)
		for _, k := range stats {
			s.metrics.key(sv.Name, k.ID)
		}
	}
	return nil
}

// watchServiceLimits keeps service limits in step with the store.
func (s *Server) watchServiceLimits(ctx context.Context) {
	t := time.NewTicker(time.Duration(s.cfg.SyncInterval))
	defer t.Stop()
	last, _ := s.st.Version(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		v, err := s.st.Version(ctx)
		if err != nil || v == last {
			continue
		}
		if err := s.refreshServiceLimits(ctx); err == nil {
			last = v
		}
		// The syncer reloads keys on the same version change; end what
		// disabled or removed keys serve once it has.
		if err := s.syncer.Sync(ctx); err == nil {
			s.sweepKeys()
		}
	}
}

func (s *Server) serviceLimits(name string) store.Limits {
	return s.meta(name).limits
}

var errInternal = httpx.Errorf(http.StatusInternalServerError, httpx.CodeInternal, "internal error")

// writeError writes an API error in the contract's JSON shape and notes
// its code for the access log.
func writeError(w http.ResponseWriter, err error) {
	httpx.WriteError(w, err)
}

// externalNamed returns the services declared with an external_name.
func externalNamed(cfg Config) []string {
	var named []string
	for _, sp := range cfg.Services {
		if sp.ExternalName != "" {
			named = append(named, sp.Name)
		}
	}
	return named
}

// rewrapper is a store that re-seals its secrets (sqlstore does).
type rewrapper interface {
	Rewrap(ctx context.Context) (int, error)
}

// rewrap re-seals every stored secret with the current encryption key
// after a rotation (KEYPOOL_ENCRYPTION_KEY=new,old), while serving. When
// it reports done, the old key can be dropped from the list.
func (s *Server) rewrap(ctx context.Context) {
	start := time.Now()
	n, err := s.st.(rewrapper).Rewrap(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Error("re-sealing stored keys with the current encryption key failed; the old keys are still needed", "error", err.Error(), "rewrapped", n)
		}
		return
	}
	s.log.Info("stored keys re-sealed with the current encryption key; older keys can be removed from KEYPOOL_ENCRYPTION_KEY",
		"rewrapped", n, "took", time.Since(start).Round(time.Millisecond).String())
}

// openStore takes [Config.Store], or opens [Config.Database] with keyring.
func (s *Server) openStore(ctx context.Context, keyring *seal.Keyring) error {
	if s.cfg.Store == nil {
		st, err := sqlstore.Open(ctx, s.cfg.Database.Reveal(), sqlstore.Options{Keyring: keyring, Logger: s.log})
		if err != nil {
			return fmt.Errorf("server: open database %s: %w", s.cfg.Database, err)
		}
		s.st = st
		return nil
	}
	st, ok := s.cfg.Store.(serverStore)
	if !ok {
		return fmt.Errorf("server: Config.Store (%T) must also implement store.AdminStore (admin users, sessions, audit log)", s.cfg.Store)
	}
	s.st = st
	return nil
}
