package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"reflect"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/keypool/keypool"
)

// Defaults of [SyncerOptions].
const (
	DefaultSyncInterval     = 2 * time.Second
	DefaultExternalInterval = 30 * time.Second
)

// Listener is a source of change notifications, such as PostgreSQL
// LISTEN/NOTIFY (sqlstore's Store implements it). Listen calls fn, from
// any goroutine, each time something may have changed, and blocks until
// ctx is done. It should call fn once more after every (re)connection, so
// that a change made while it was not listening is not missed. It returns
// an error wrapping [errors.ErrUnsupported] at once when the backend has no
// notifications.
type Listener interface {
	Listen(ctx context.Context, fn func()) error
}

// ServiceMapper is the optional interface of an external key [Source] that
// reads keys by keypool service name once told each one's external name
// (store/external's Source implements it). See [SyncerOptions.External].
type ServiceMapper interface {
	SetServices(m map[string]string) error
}

// SyncerOptions configures a [Syncer]. The zero value polls the primary
// source every two seconds and has no external source and no
// notifications.
type SyncerOptions struct {
	// Interval is how often the primary source's Version is checked; the
	// services and keys are re-read only when it changed. If zero,
	// [DefaultSyncInterval].
	Interval time.Duration `json:"interval,omitempty"`
	// External, if set, is an extra source of keys, such as an external
	// credential table: a service with an ExternalName gets that source's
	// keys for it in addition to its own (its own keys win an id clash).
	// If External implements [ServiceMapper], it is given the map of
	// service name → ExternalName and asked for Keys by service name;
	// otherwise it is asked for Keys by external name. Its Services are
	// never read.
	External Source `json:"-"`
	// ExternalInterval is how often External's Version is checked. If
	// zero, [DefaultExternalInterval].
	ExternalInterval time.Duration `json:"external_interval,omitempty"`
	// Notify, if set, delivers change notifications from the primary
	// source; each one triggers a check (see [Syncer.Trigger]), so a
	// change made through another replica arrives without waiting for
	// Interval. Polling goes on regardless.
	Notify Listener `json:"-"`
	// Registry resolves the selector, auth_scheme and classifier names of
	// the services (see [Registry.ToPool]). Nil: the built-in names only.
	Registry *Registry `json:"-"`
	// Logger receives outages (once when one starts, once when it ends),
	// services that fail to convert, and notification errors; never a
	// secret. If nil, slog.Default().
	Logger *slog.Logger `json:"-"`
}

// SyncStatus is a snapshot of a [Syncer]'s health, for readiness probes
// and the admin API.
type SyncStatus struct {
	// Ready reports whether a load has succeeded and the last check of
	// the primary source succeeded.
	Ready bool `json:"ready"`
	// Loaded reports whether a load has ever succeeded.
	Loaded bool `json:"loaded"`
	// Version is the primary source's version of the copy in the pool.
	Version string `json:"version,omitempty"`
	// Services and Keys count what the syncer put in the pool.
	Services int `json:"services"`
	Keys     int `json:"keys"`
	// LastCheck is when the last check of the primary source ended, and
	// LastSuccess when the last successful one did.
	LastCheck   time.Time `json:"last_check,omitzero"`
	LastSuccess time.Time `json:"last_success,omitzero"`
	// LastReload is when the pool was last updated from the sources.
	LastReload time.Time `json:"last_reload,omitzero"`
	// Error says why the last check failed ("store unreachable: …");
	// empty when it succeeded. DownSince is when the outage began.
	Error     string    `json:"error,omitempty"`
	DownSince time.Time `json:"down_since,omitzero"`
	// ExternalError says why the last read of the external source failed;
	// its services keep their last good external keys meanwhile.
	ExternalError string `json:"external_error,omitempty"`
}

// Syncer keeps a [keypool.Pool] in step with a primary [Source] (services
// and their keys) and an optional external key source. It checks the
// sources' cheap Version on an interval, on [Syncer.Trigger] and on
// notifications, and re-reads them only when a version changed. A reload
// calls [keypool.Pool.SetService] only for services whose records or keys
// changed (the pool keeps the live state of keys whose ID and Secret are
// unchanged) and [keypool.Pool.RemoveService] for services that are gone;
// a service keeps its Selector instance while its selector name is
// unchanged, so round-robin counters carry over. Services it did not put
// in the pool are left alone.
//
// When a source is unreachable the pool keeps its last good copy, [Syncer.Ready]
// turns false and the outage is logged once, with one more line when it
// ends. A service whose stored settings fail to convert (an unknown
// auth_scheme, say) keeps its previous copy, and the error is logged once.
//
// A Syncer is safe for concurrent use and must not be copied.
type Syncer struct {
	pool    *keypool.Pool
	src     Source
	opts    SyncerOptions
	log     *slog.Logger
	now     func() time.Time
	trig    chan struct{} // capacity 1: pending triggers coalesce
	closed  chan struct{}
	closeMu sync.Once

	// sem serialises loads (it is held across I/O, so it is a channel and
	// waits honour contexts); it protects everything in data.
	sem  chan struct{}
	data syncData

	mu sync.Mutex // protects st; never held across I/O or a pool call
	st syncState
}

// syncData is what the last load read and applied; see Syncer.sem.
type syncData struct {
	loaded   bool
	version  string
	services []Service
	local    map[string][]Key // by service name

	extChecked time.Time
	extVersion string
	extNames   map[string]string // service → external name, as last read
	ext        map[string][]Key  // by keypool service name, last good
	applied    map[string]*appliedService
}

// appliedService is what a service last got in the pool.
type appliedService struct {
	rec     Service
	keys    []Key
	sel     keypool.Selector
	selName string
	badErr  string // last conversion error logged
}

type syncState struct {
	loaded                     bool
	version                    string
	services, keys             int
	lastCheck, lastOK, lastRel time.Time
	err                        error
	downSince                  time.Time
	extErr                     error
}

// NewSyncer returns a Syncer that loads src (and opts.External) into
// pool. Nothing is read until [Syncer.Load], [Syncer.Sync] or [Syncer.Run].
func NewSyncer(pool *keypool.Pool, src Source, opts SyncerOptions) *Syncer {
	if opts.Interval <= 0 {
		opts.Interval = DefaultSyncInterval
	}
	if opts.ExternalInterval <= 0 {
		opts.ExternalInterval = DefaultExternalInterval
	}
	s := &Syncer{
		pool:   pool,
		src:    src,
		opts:   opts,
		log:    opts.Logger,
		now:    time.Now,
		trig:   make(chan struct{}, 1),
		closed: make(chan struct{}),
		sem:    make(chan struct{}, 1),
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	s.data.applied = map[string]*appliedService{}
	s.data.ext = map[string][]Key{}
	return s
}

// Load reads every service and key from the sources and applies them to
// the pool, whatever the versions say. Use it at start-up: an error means
// the primary source could not be read, and if no earlier load succeeded
// the pool holds nothing from it. An unreachable external source is not an
// error (see [SyncStatus.ExternalError]).
func (s *Syncer) Load(ctx context.Context) error {
	if err := s.acquire(ctx); err != nil {
		return err
	}
	defer s.release()
	return s.reload(ctx, true)
}

// Sync checks the sources' versions now and reloads what changed,
// returning when done; an error means the primary source could not be
// checked or read. The external source is checked when
// [SyncerOptions.ExternalInterval] has passed since its last check, or
// when the primary source changed.
func (s *Syncer) Sync(ctx context.Context) error {
	if err := s.acquire(ctx); err != nil {
		return err
	}
	defer s.release()
	return s.reload(ctx, false)
}

// Trigger asks [Syncer.Run] for a check as soon as possible and returns at
// once; triggers that arrive while one is pending coalesce into it. The
// admin API calls it after every write.
func (s *Syncer) Trigger() {
	select {
	case s.trig <- struct{}{}:
	default:
	}
}

// Run checks the sources at once, then every [SyncerOptions.Interval], on
// each [Syncer.Trigger] and on each notification from
// [SyncerOptions.Notify], until ctx is done or [Syncer.Close] is called.
// It returns ctx.Err() or nil after Close, once every goroutine it started
// has ended. Check failures are reported by [Syncer.Status], not returned.
func (s *Syncer) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	if s.opts.Notify != nil {
		wg.Go(func() { s.listen(ctx) })
	}
	tick := time.NewTicker(s.opts.Interval)
	defer tick.Stop()
	for {
		_ = s.Sync(ctx) // logged and recorded in the status
		select {
		case <-ctx.Done():
			if s.isClosed() {
				return nil
			}
			return ctx.Err()
		case <-s.closed:
			return nil
		case <-tick.C:
		case <-s.trig:
		}
	}
}

// Close stops [Syncer.Run]. It does not touch the pool, which keeps what it
// holds. It always returns nil.
func (s *Syncer) Close() error {
	s.closeMu.Do(func() { close(s.closed) })
	return nil
}

func (s *Syncer) isClosed() bool {
	select {
	case <-s.closed:
		return true
	default:
		return false
	}
}

// Ready reports whether a load has succeeded and the last check of the
// primary source succeeded. While it is false after an outage, the pool
// keeps serving its last good copy.
func (s *Syncer) Ready() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.loaded && s.st.err == nil
}

// Status returns a snapshot of the syncer's health.
func (s *Syncer) Status() SyncStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := SyncStatus{
		Ready:       s.st.loaded && s.st.err == nil,
		Loaded:      s.st.loaded,
		Version:     s.st.version,
		Services:    s.st.services,
		Keys:        s.st.keys,
		LastCheck:   s.st.lastCheck,
		LastSuccess: s.st.lastOK,
		LastReload:  s.st.lastRel,
		DownSince:   s.st.downSince,
	}
	if s.st.err != nil {
		st.Error = "store unreachable: " + s.st.err.Error()
	} else if !s.st.loaded {
		st.Error = "not loaded yet"
	}
	if s.st.extErr != nil {
		st.ExternalError = "external source unreachable: " + s.st.extErr.Error()
	}
	return st
}

func (s *Syncer) acquire(ctx context.Context) error {
	select {
	case s.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Syncer) release() { <-s.sem }

// listen runs the notification listener until ctx ends; its error, other
// than ctx's end, is logged and polling carries on.
func (s *Syncer) listen(ctx context.Context) {
	err := s.opts.Notify.Listen(ctx, s.Trigger)
	switch {
	case ctx.Err() != nil:
	case errors.Is(err, errors.ErrUnsupported):
		s.log.Info("store: change notifications not supported; polling only", "interval", s.opts.Interval.String(), "err", err)
	default:
		s.log.Warn("store: change notifications stopped; polling only", "interval", s.opts.Interval.String(), "err", err)
	}
}

// reload checks (force: skips the version comparison) and applies. The
// caller holds sem.
func (s *Syncer) reload(ctx context.Context, force bool) error {
	d := &s.data
	v, err := s.src.Version(ctx)
	var services []Service
	var keys []Key
	changed := force || !d.loaded || v != d.version
	if err == nil && changed {
		services, err = s.src.Services(ctx)
		if err == nil {
			keys, err = s.src.Keys(ctx, "")
		}
	}
	if err != nil {
		if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
			return err // shutting down: not an outage
		}
		s.primaryFailed(err)
		return err
	}
	if changed {
		sort.Slice(services, func(i, j int) bool { return services[i].Name < services[j].Name })
		local := make(map[string][]Key, len(services))
		for _, k := range keys {
			local[k.Service] = append(local[k.Service], k)
		}
		d.services, d.local, d.version, d.loaded = services, local, v, true
	}

	extChanged := false
	if s.opts.External != nil {
		names := externalNames(d.services)
		due := force || changed || s.now().Sub(d.extChecked) >= s.opts.ExternalInterval ||
			!maps.Equal(names, d.extNames)
		if due {
			extChanged = s.reloadExternal(ctx, names, force || !maps.Equal(names, d.extNames))
		}
	}

	var nsvc, nkeys int
	if changed || extChanged {
		nsvc, nkeys = s.apply()
	}
	s.primaryOK(v, changed || extChanged, nsvc, nkeys)
	return nil
}

// externalNames maps each service with an ExternalName to it.
func externalNames(services []Service) map[string]string {
	m := map[string]string{}
	for _, sv := range services {
		if sv.ExternalName != "" {
			m[sv.Name] = sv.ExternalName
		}
	}
	return m
}

// reloadExternal re-reads the external keys of the services in names when
// the external version changed (or force), and reports whether d.ext
// changed. On failure the last good keys stay.
func (s *Syncer) reloadExternal(ctx context.Context, names map[string]string, force bool) bool {
	d := &s.data
	ext := s.opts.External
	d.extChecked = s.now()
	v, err := ext.Version(ctx)
	if err == nil && !force && v == d.extVersion && d.extVersion != "" {
		s.externalOK()
		return false
	}
	mapper, _ := ext.(ServiceMapper)
	if err == nil && mapper != nil {
		err = mapper.SetServices(maps.Clone(names))
	}
	next := make(map[string][]Key, len(names))
	if err == nil {
		for _, name := range sortedKeys(names) {
			arg := names[name]
			if mapper != nil {
				arg = name
			}
			var keys []Key
			keys, err = ext.Keys(ctx, arg)
			if err != nil {
				break
			}
			for i := range keys {
				keys[i].Service = name
			}
			next[name] = keys
		}
	}
	if err != nil {
		if ctx.Err() == nil || !errors.Is(err, ctx.Err()) {
			s.externalFailed(err)
		}
		// Keep last good keys of services still mapped to the same name.
		for name := range d.ext {
			if names[name] == "" || names[name] != d.extNames[name] {
				delete(d.ext, name)
			}
		}
		changed := !maps.Equal(names, d.extNames)
		// Forget the version so the next check re-reads every mapped
		// service, including any mapped during the outage.
		d.extVersion = ""
		return changed
	}
	s.externalOK()
	d.extVersion, d.extNames = v, maps.Clone(names)
	changed := !reflect.DeepEqual(next, d.ext)
	d.ext = next
	return changed
}

func sortedKeys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// apply puts d's services into the pool, touching only what changed, and
// returns how many services and keys the pool now holds from the syncer.
func (s *Syncer) apply() (nsvc, nkeys int) {
	d := &s.data
	seen := make(map[string]bool, len(d.services))
	for _, rec := range d.services {
		seen[rec.Name] = true
		keys := joinKeys(d.local[rec.Name], d.ext[rec.Name])
		a := d.applied[rec.Name]
		if a != nil && a.badErr == "" && reflect.DeepEqual(a.rec, rec) && reflect.DeepEqual(a.keys, keys) {
			nsvc++
			nkeys += len(keys)
			continue
		}
		err := s.applyService(rec, keys, a)
		if err != nil {
			if a == nil {
				a = &appliedService{}
				d.applied[rec.Name] = a
			}
			if a.badErr != err.Error() {
				a.badErr = err.Error()
				s.log.Error("store: service not loaded; the pool keeps its previous copy", "service", rec.Name, "err", err)
			}
			if a.sel != nil {
				nsvc++
				nkeys += len(a.keys)
			}
			continue
		}
		nsvc++
		nkeys += len(keys)
	}
	for name, a := range d.applied {
		if !seen[name] {
			if a.sel != nil {
				s.pool.RemoveService(name)
			}
			delete(d.applied, name)
		}
	}
	return nsvc, nkeys
}

// applyService converts and sets one service, reusing prev's selector when
// its name is unchanged.
func (s *Syncer) applyService(rec Service, keys []Key, prev *appliedService) error {
	svc, pk, err := s.opts.Registry.ToPool(rec, keys)
	if err != nil {
		return err
	}
	selName := normSelector(rec.Selector)
	if prev != nil && prev.sel != nil && prev.selName == selName {
		svc.Selector = prev.sel
	}
	if err := s.pool.SetService(svc, pk); err != nil {
		return err
	}
	s.data.applied[rec.Name] = &appliedService{rec: rec, keys: keys, sel: svc.Selector, selName: selName}
	return nil
}

// normSelector returns the canonical form of a selector name, so that
// spellings ParseSelector treats alike keep the selector instance.
func normSelector(name string) string {
	n := strings.ReplaceAll(strings.ToLower(strings.TrimSpace(name)), "-", "_")
	switch n {
	case "", "roundrobin":
		return "round_robin"
	case "priority":
		return "ordered"
	}
	return n
}

// joinKeys returns local followed by the external keys whose ids local
// does not use.
func joinKeys(local, ext []Key) []Key {
	if len(ext) == 0 {
		return local
	}
	ids := make(map[string]bool, len(local))
	out := make([]Key, 0, len(local)+len(ext))
	for _, k := range local {
		ids[k.ID] = true
		out = append(out, k)
	}
	for _, k := range ext {
		if !ids[k.ID] {
			ids[k.ID] = true
			out = append(out, k)
		}
	}
	return out
}

func (s *Syncer) primaryFailed(err error) {
	now := s.now()
	s.mu.Lock()
	first := s.st.err == nil
	s.st.err, s.st.lastCheck = err, now
	if first {
		s.st.downSince = now
	}
	loaded := s.st.loaded
	s.mu.Unlock()
	if first {
		s.log.Error("store: source unreachable; the pool keeps serving its last good copy", "err", err, "loaded", loaded)
	}
}

func (s *Syncer) primaryOK(version string, reloaded bool, nsvc, nkeys int) {
	now := s.now()
	s.mu.Lock()
	wasDown, since := s.st.err != nil, s.st.downSince
	s.st.err, s.st.downSince = nil, time.Time{}
	s.st.loaded, s.st.version = true, version
	s.st.lastCheck, s.st.lastOK = now, now
	if reloaded {
		s.st.lastRel, s.st.services, s.st.keys = now, nsvc, nkeys
	}
	s.mu.Unlock()
	if wasDown {
		s.log.Info("store: source reachable again", "down_for", now.Sub(since).Round(time.Millisecond).String())
	}
}

func (s *Syncer) externalFailed(err error) {
	s.mu.Lock()
	first := s.st.extErr == nil
	s.st.extErr = err
	s.mu.Unlock()
	if first {
		s.log.Error("store: external key source unreachable; keeping its last good keys", "err", err)
	}
}

func (s *Syncer) externalOK() {
	s.mu.Lock()
	wasDown := s.st.extErr != nil
	s.st.extErr = nil
	s.mu.Unlock()
	if wasDown {
		s.log.Info("store: external key source reachable again")
	}
}

// ToPool converts a stored service and its keys into the pool's types:
// auth_scheme and selector are parsed (the Selector is new on every call),
// proxy headers and labels are copied, and each key's Status becomes its
// [keypool.Key.State] with StatusReason as Reason. An empty status is
// active; an unknown one is treated as disabled, so a bad row never serves.
// A key's labels["feature"] names a feature it serves; its Features (its
// tier's) become [keypool.Key.Features]. The error, wrapping [keypool.ErrInvalidConfig], names the service.
func ToPool(svc Service, keys []Key) (keypool.Service, []keypool.Key, error) {
	return (*Registry)(nil).ToPool(svc, keys)
}

// ToPool is [ToPool] with the names registered in r: auth_scheme,
// selector and classifier are resolved by r.
func (r *Registry) ToPool(svc Service, keys []Key) (keypool.Service, []keypool.Key, error) {
	auth, _, err := r.AuthScheme(svc.AuthScheme)
	if err != nil {
		return keypool.Service{}, nil, fmt.Errorf("service %q: %w", svc.Name, err)
	}
	sel, _, err := r.Selector(svc.Selector)
	if err != nil {
		return keypool.Service{}, nil, fmt.Errorf("service %q: %w", svc.Name, err)
	}
	classify, _, err := r.Classifier(svc.Classifier)
	if err != nil {
		return keypool.Service{}, nil, fmt.Errorf("service %q: classifier: %w", svc.Name, err)
	}
	ps := keypool.Service{
		Name:         svc.Name,
		BaseURL:      svc.BaseURL,
		Auth:         auth,
		RateLimitRPM: svc.RateLimitRPM,
		MaxInFlight:  svc.MaxInFlight,
		Selector:     sel,
		Classifier:   classify,
		Headers:      maps.Clone(svc.ProxyHeaders),

		RetryAfterCap:      time.Duration(svc.RetryAfterCap) * time.Second,
		ConfirmRefusals:    svc.ConfirmRefusals,
		MinActiveKeys:      svc.MinActiveKeys,
		MaxEjectionPercent: svc.MaxEjectionPercent,
		HeaderTimeout:      svc.HeaderTimeout,
		IdleTimeout:        svc.IdleTimeout,
		Timeout:            svc.RequestTimeout,
	}
	pk := make([]keypool.Key, len(keys))
	for i, k := range keys {
		st, reason := poolState(k.Status, k.StatusReason)
		pk[i] = keypool.Key{
			ID:           k.ID,
			Secret:       k.Secret,
			Weight:       k.Weight,
			Priority:     k.Priority,
			RateLimitRPM: k.RateLimitRPM,
			MaxInFlight:  k.MaxInFlight,
			Labels:       maps.Clone(k.Labels),
			Features:     maps.Clone(k.Features),
			BalanceTotal: k.BalanceTotal,
			BalanceUsed:  k.BalanceUsed,
			BalanceUnit:  k.BalanceUnit,
			State:        st,
			Reason:       reason,
		}
	}
	return ps, pk, nil
}

func poolState(status, reason string) (keypool.State, string) {
	switch status {
	case "", StatusActive:
		return keypool.StateActive, reason
	case StatusDisabled:
		return keypool.StateDisabled, reason
	case StatusInvalid:
		return keypool.StateInvalid, reason
	case StatusExhausted:
		return keypool.StateExhausted, reason
	}
	if reason == "" {
		reason = fmt.Sprintf("unknown stored status %q", status)
	}
	return keypool.StateDisabled, reason
}
