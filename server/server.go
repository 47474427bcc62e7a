package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"reflect"
	"runtime/debug"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/admin"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/console"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/internal/keystate"
	"github.com/keypool/keypool/limit"
	"github.com/keypool/keypool/proxy"
	"github.com/keypool/keypool/route"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/external"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/sqlstore"
)

// Server is a keypoold server. Create it with [New]; serve it with
// [Server.Run] or [Server.Serve], or mount [Server.Handler] yourself; stop
// it with [Server.Shutdown]. It must not be copied.
type Server struct {
	cfg     Config
	log     *slog.Logger
	now     func() time.Time
	st      serverStore
	ext     *external.Source // nil without an external credential table
	rdb     *redis.Client    // nil without Redis; shared by the parts below
	pool    *keypool.Pool
	syncer  *store.Syncer
	keys    *keystate.Keeper // key state: persisted, shared, charged
	leases  *leaseBook
	metrics *metrics
	proxy   *proxy.Handler
	routes  *route.Handler // routers, in front of proxy
	handler http.Handler

	// The parts, declared in parts.go (serving in serving.go); their
	// fields and methods are promoted.
	catalog  // per-service settings beside the pool
	gate     // client authentication, its cache sync and open calls
	counters // rate limits and budgets
	records  // usage records and their journal
	consoles // admin API, console, sign-in
	logs     // the server's own log output
	serving  // listeners, in-flight work, background work, shutdown
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

	s := &Server{cfg: cfg, log: log, now: cfg.Now}
	s.logBuf, s.done = logBuf, make(chan struct{})
	s.onHijack = s.hijacked.add
	s.catalog.log = log
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
		if err := s.records.openJournal(ctx, cfg, s.st, log); err != nil {
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
		s.keys.Share(s.rdb)
	}
	s.counters.log, s.counters.st, s.counters.now, s.counters.metrics = log, s.st, s.now, s.metrics
	if err := s.counters.build(ctx, cfg, s.rdb); err != nil {
		return nil, err
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
