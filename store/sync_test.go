package store

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keypool/keypool"
)

// fakeSource is an in-memory Source with a failing switch. Every mutation
// bumps its version.
type fakeSource struct {
	mu           sync.Mutex
	services     map[string]Service
	keys         []Key
	version      int
	fail         error
	versionCalls int
	keysCalls    []string
	mapping      map[string]string // set by SetServices when mapper
	gate         chan struct{}     // if set, Version waits for a receive
	entered      chan struct{}     // if set, Version signals on entry
}

func newFakeSource() *fakeSource { return &fakeSource{services: map[string]Service{}} }

func (f *fakeSource) Services(context.Context) ([]Service, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return nil, f.fail
	}
	return slices.Collect(maps.Values(f.services)), nil
}

func (f *fakeSource) Keys(_ context.Context, service string) ([]Key, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.keysCalls = append(f.keysCalls, service)
	if f.fail != nil {
		return nil, f.fail
	}
	var out []Key
	for _, k := range f.keys {
		if service == "" || k.Service == service {
			k.Labels = maps.Clone(k.Labels)
			out = append(out, k)
		}
	}
	return out, nil
}

func (f *fakeSource) Version(context.Context) (string, error) {
	if f.entered != nil {
		f.entered <- struct{}{}
	}
	if f.gate != nil {
		<-f.gate
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.versionCalls++
	if f.fail != nil {
		return "", f.fail
	}
	return strconv.Itoa(f.version), nil
}

func (f *fakeSource) edit(fn func(f *fakeSource)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
	f.version++
}

func (f *fakeSource) setFail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}

func (f *fakeSource) calls() (version int, keys []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.versionCalls, slices.Clone(f.keysCalls)
}

// mapperSource is a fakeSource that implements ServiceMapper the way
// store/external does: Keys takes a keypool name and reads its mapped rows.
type mapperSource struct{ *fakeSource }

func (m mapperSource) SetServices(mp map[string]string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mapping = maps.Clone(mp)
	return nil
}

func (m mapperSource) Keys(ctx context.Context, service string) ([]Key, error) {
	m.mu.Lock()
	ext := m.mapping[service]
	m.mu.Unlock()
	if ext == "" {
		ext = service
	}
	return m.fakeSource.Keys(ctx, ext)
}

// syncLog is a goroutine-safe log sink.
type syncLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncLog) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncLog) count(sub string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.b.String(), sub)
}

type syncClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *syncClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *syncClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

type syncHarness struct {
	t     *testing.T
	src   *fakeSource
	pool  *keypool.Pool
	sync  *Syncer
	logs  *syncLog
	clock *syncClock
}

func newSyncHarness(t *testing.T, opts SyncerOptions) *syncHarness {
	t.Helper()
	clock := &syncClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	pool, err := keypool.New(keypool.Config{Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncLog{}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(logs, nil))
	}
	src := newFakeSource()
	s := NewSyncer(pool, src, opts)
	s.now = clock.Now
	return &syncHarness{t: t, src: src, pool: pool, sync: s, logs: logs, clock: clock}
}

func (h *syncHarness) mustSync() {
	h.t.Helper()
	if err := h.sync.Sync(context.Background()); err != nil {
		h.t.Fatalf("Sync: %v", err)
	}
}

// snapshot renders the pool as "svc[id:state,…] …", sorted.
func poolSnapshot(p *keypool.Pool) string {
	var parts []string
	for _, name := range p.Services() {
		st, _ := p.Stats(name)
		var ks []string
		for _, k := range st {
			ks = append(ks, k.ID+":"+k.State.String())
		}
		slices.Sort(ks)
		parts = append(parts, name+"["+strings.Join(ks, ",")+"]")
	}
	return strings.Join(parts, " ")
}

func syncSvc(name string) Service {
	return Service{Name: name, BaseURL: "https://" + name + ".example", AuthScheme: "bearer"}
}

func syncKey(service, id, secret string) Key {
	return Key{ID: id, Service: service, Secret: keypool.Secret(secret), Status: StatusActive}
}

func syncSeed(f *fakeSource) {
	f.services["openai"] = syncSvc("openai")
	f.services["groq"] = syncSvc("groq")
	f.keys = []Key{syncKey("openai", "k1", "sk-1"), syncKey("openai", "k2", "sk-2"), syncKey("groq", "g1", "gsk-1")}
}

func TestSyncerReload(t *testing.T) {
	tests := []struct {
		name string
		edit func(f *fakeSource)
		want string
	}{
		{"unchanged", func(*fakeSource) {}, "groq[g1:active] openai[k1:active,k2:active]"},
		{"add service", func(f *fakeSource) {
			f.services["exa"] = syncSvc("exa")
			f.keys = append(f.keys, syncKey("exa", "e1", "exa-1"))
		}, "exa[e1:active] groq[g1:active] openai[k1:active,k2:active]"},
		{"remove service", func(f *fakeSource) {
			delete(f.services, "groq")
			f.keys = f.keys[:2]
		}, "openai[k1:active,k2:active]"},
		{"add key", func(f *fakeSource) {
			f.keys = append(f.keys, syncKey("groq", "g2", "gsk-2"))
		}, "groq[g1:active,g2:active] openai[k1:active,k2:active]"},
		{"remove key", func(f *fakeSource) {
			f.keys = slices.DeleteFunc(f.keys, func(k Key) bool { return k.ID == "k2" })
		}, "groq[g1:active] openai[k1:active]"},
		{"disable key", func(f *fakeSource) {
			f.keys[1].Status, f.keys[1].StatusReason = StatusDisabled, "admin"
		}, "groq[g1:active] openai[k1:active,k2:disabled]"},
		{"invalid and exhausted keys", func(f *fakeSource) {
			f.keys[0].Status, f.keys[1].Status = StatusInvalid, StatusExhausted
		}, "groq[g1:active] openai[k1:invalid,k2:exhausted]"},
		{"key moves service", func(f *fakeSource) {
			f.keys[1].Service = "groq"
		}, "groq[g1:active,k2:active] openai[k1:active]"},
		{"service with bad auth scheme keeps its copy", func(f *fakeSource) {
			s := f.services["groq"]
			s.AuthScheme = "carrier-pigeon"
			f.services["groq"] = s
			f.keys = append(f.keys, syncKey("groq", "g2", "gsk-2"))
		}, "groq[g1:active] openai[k1:active,k2:active]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newSyncHarness(t, SyncerOptions{})
			syncSeed(h.src)
			if err := h.sync.Load(context.Background()); err != nil {
				t.Fatal(err)
			}
			h.src.edit(tt.edit)
			h.mustSync()
			if got := poolSnapshot(h.pool); got != tt.want {
				t.Errorf("pool = %s, want %s", got, tt.want)
			}
			st := h.sync.Status()
			if !st.Ready || st.Error != "" || st.Version != strconv.Itoa(h.src.version) {
				t.Errorf("status = %+v", st)
			}
		})
	}
}

func TestSyncerBadServiceLoggedOnce(t *testing.T) {
	h := newSyncHarness(t, SyncerOptions{})
	syncSeed(h.src)
	h.src.edit(func(f *fakeSource) {
		s := f.services["groq"]
		s.Selector = "fastest-please"
		f.services["groq"] = s
	})
	for range 3 {
		h.src.edit(func(f *fakeSource) {
			f.keys = append(f.keys, syncKey("openai", "k"+strconv.Itoa(f.version+10), "sk-"+strconv.Itoa(f.version)))
		})
		h.mustSync()
	}
	if n := h.logs.count("service not loaded"); n != 1 {
		t.Errorf("logged %d times, want 1:\n%s", n, h.logs.b.String())
	}
	if slices.Contains(h.pool.Services(), "groq") {
		t.Error("groq loaded despite a bad selector")
	}
	h.src.edit(func(f *fakeSource) { f.services["groq"] = syncSvc("groq") })
	h.mustSync()
	if !slices.Contains(h.pool.Services(), "groq") {
		t.Error("groq not loaded once fixed")
	}
}

func TestSyncerUnchangedVersionReadsNothing(t *testing.T) {
	h := newSyncHarness(t, SyncerOptions{})
	syncSeed(h.src)
	h.mustSync()
	for range 5 {
		h.mustSync()
	}
	v, keys := h.src.calls()
	if v != 6 || len(keys) != 1 {
		t.Errorf("version calls %d, keys calls %v; want 6 and one", v, keys)
	}
}

func TestSyncerKeepsLiveState(t *testing.T) {
	h := newSyncHarness(t, SyncerOptions{})
	syncSeed(h.src)
	h.mustSync()
	sel, _ := h.pool.Service("openai")

	// Cool k1 down for 30 s.
	for {
		l, err := h.pool.Acquire("openai", keypool.Request{})
		if err != nil {
			t.Fatal(err)
		}
		if l.KeyID() == "k1" {
			l.Release(keypool.Outcome{Kind: keypool.RateLimited, RetryAfter: 30 * time.Second})
			break
		}
		l.Release(keypool.Outcome{Kind: keypool.OK})
	}
	until := coolUntil(t, h.pool, "k1")
	if until.Before(h.clock.Now().Add(30 * time.Second)) {
		t.Fatalf("k1 cools until %v, want 30s or more", until)
	}
	edits := []struct {
		name string
		edit func(f *fakeSource)
	}{
		{"service base url", func(f *fakeSource) {
			s := f.services["openai"]
			s.BaseURL = "https://proxy.example"
			s.ProxyHeaders = map[string]string{"X-A": "b"}
			f.services["openai"] = s
		}},
		{"key weight and labels", func(f *fakeSource) {
			f.keys[0].Weight, f.keys[0].Labels = 5, map[string]string{"tier": "pro"}
		}},
		{"another key added", func(f *fakeSource) { f.keys = append(f.keys, syncKey("openai", "k3", "sk-3")) }},
		{"external credit used", func(f *fakeSource) { f.keys[0].BalanceTotal, f.keys[0].BalanceUsed = 10, 1 }},
	}
	for _, e := range edits {
		h.src.edit(e.edit)
		h.mustSync()
		if got := coolUntil(t, h.pool, "k1"); !got.Equal(until) {
			t.Errorf("after %s: k1 cools until %v, want %v", e.name, got, until)
		}
	}
	got, _ := h.pool.Service("openai")
	if got.Selector != sel.Selector {
		t.Error("selector instance replaced though the selector name did not change")
	}
	if got.BaseURL != "https://proxy.example" || got.Headers["X-A"] != "b" {
		t.Errorf("service not updated: %+v", got)
	}

	// A new secret under the same id is a new key: fresh state.
	h.src.edit(func(f *fakeSource) { f.keys[0].Secret = "sk-rotated" })
	h.mustSync()
	stats, _ := h.pool.Stats("openai")
	if stats[0].ID != "k1" || stats[0].State != keypool.StateActive {
		t.Errorf("rotated k1 = %+v, want active", stats[0])
	}

	// Changing the selector name gives a new selector.
	h.src.edit(func(f *fakeSource) {
		s := f.services["openai"]
		s.Selector = "random"
		f.services["openai"] = s
	})
	h.mustSync()
	got, _ = h.pool.Service("openai")
	if _, ok := got.Selector.(keypool.Random); !ok {
		t.Errorf("selector = %T, want Random", got.Selector)
	}
}

// coolUntil returns when openai's key id stops cooling, failing t when it
// is not cooling.
func coolUntil(t *testing.T, p *keypool.Pool, id string) time.Time {
	t.Helper()
	stats, _ := p.Stats("openai")
	for _, s := range stats {
		if s.ID == id {
			if s.State != keypool.StateCooling {
				t.Errorf("%s is %s, want cooling", id, s.State)
			}
			return s.Until
		}
	}
	t.Fatalf("%s not in the pool", id)
	return time.Time{}
}

func TestSyncerOutage(t *testing.T) {
	h := newSyncHarness(t, SyncerOptions{})
	syncSeed(h.src)
	ctx := context.Background()

	// Unreachable at start: nothing loaded, not ready.
	down := errors.New("dial tcp 127.0.0.1:5432: connection refused")
	h.src.setFail(down)
	if err := h.sync.Load(ctx); !errors.Is(err, down) {
		t.Fatalf("Load = %v, want %v", err, down)
	}
	if st := h.sync.Status(); st.Ready || st.Loaded || !strings.Contains(st.Error, "store unreachable") {
		t.Errorf("status at start = %+v", st)
	}
	h.src.setFail(nil)
	h.mustSync()

	for outage := 1; outage <= 2; outage++ {
		h.src.setFail(down)
		for range 5 {
			h.clock.Add(2 * time.Second)
			if err := h.sync.Sync(ctx); !errors.Is(err, down) {
				t.Fatalf("Sync = %v", err)
			}
		}
		st := h.sync.Status()
		if h.sync.Ready() || st.Ready || !st.Loaded || !strings.Contains(st.Error, "connection refused") ||
			!st.DownSince.Equal(h.clock.Now().Add(-8*time.Second)) {
			t.Errorf("status during outage = %+v", st)
		}
		// The pool keeps serving its last good copy.
		l, err := h.pool.Acquire("openai", keypool.Request{})
		if err != nil {
			t.Fatalf("Acquire during outage: %v", err)
		}
		l.Release(keypool.Outcome{Kind: keypool.OK})

		h.src.setFail(nil)
		h.mustSync()
		h.mustSync()
		if !h.sync.Ready() {
			t.Error("not ready after recovery")
		}
		// One line when each outage starts (plus the start-up one), one
		// when it ends.
		if n := h.logs.count("source unreachable"); n != outage+1 {
			t.Errorf("outage lines = %d, want %d", n, outage+1)
		}
		if n := h.logs.count("source reachable again"); n != outage+1 {
			t.Errorf("recovery lines = %d, want %d", n, outage+1)
		}
	}
	if got, want := poolSnapshot(h.pool), "groq[g1:active] openai[k1:active,k2:active]"; got != want {
		t.Errorf("pool = %s, want %s", got, want)
	}
}

func TestSyncerFailureDuringReadKeepsCopy(t *testing.T) {
	h := newSyncHarness(t, SyncerOptions{})
	syncSeed(h.src)
	h.mustSync()
	// Version answers, the key read fails.
	h.src.edit(func(f *fakeSource) { f.keys = f.keys[:1] })
	h.src.mu.Lock()
	h.src.version++
	h.src.mu.Unlock()
	src := &failingKeys{fakeSource: h.src}
	h.sync.src = src
	if err := h.sync.Sync(context.Background()); err == nil {
		t.Fatal("Sync succeeded with a failing key read")
	}
	if got, want := poolSnapshot(h.pool), "groq[g1:active] openai[k1:active,k2:active]"; got != want {
		t.Errorf("pool = %s, want %s", got, want)
	}
	if h.sync.Ready() {
		t.Error("ready after a failed read")
	}
	h.sync.src = h.src
	h.mustSync()
	if got, want := poolSnapshot(h.pool), "groq[] openai[k1:active]"; got != want {
		t.Errorf("pool = %s, want %s", got, want)
	}
}

type failingKeys struct{ *fakeSource }

func (f *failingKeys) Keys(context.Context, string) ([]Key, error) {
	return nil, errors.New("read timeout")
}

func TestSyncerExternal(t *testing.T) {
	for _, withMapper := range []bool{false, true} {
		t.Run("mapper="+strconv.FormatBool(withMapper), func(t *testing.T) {
			ext := newFakeSource()
			ext.keys = []Key{
				syncKey("exaai", "ext_1", "exa-x1"), syncKey("exaai", "ext_2", "exa-x2"),
				syncKey("openai", "ext_3", "sk-x3"), // no service maps to it
				syncKey("exaai", "e1", "clash"),     // id taken by a local key
			}
			var src Source = ext
			if withMapper {
				src = mapperSource{ext}
			}
			h := newSyncHarness(t, SyncerOptions{External: src, ExternalInterval: 30 * time.Second})
			syncSeed(h.src)
			h.src.edit(func(f *fakeSource) {
				s := syncSvc("exa")
				s.ExternalName = "exaai"
				f.services["exa"] = s
				f.keys = append(f.keys, syncKey("exa", "e1", "exa-own"))
			})
			h.mustSync()
			want := "exa[e1:active,ext_1:active,ext_2:active] groq[g1:active] openai[k1:active,k2:active]"
			if got := poolSnapshot(h.pool); got != want {
				t.Errorf("pool = %s, want %s", got, want)
			}
			if withMapper {
				ext.mu.Lock()
				m := maps.Clone(ext.mapping)
				ext.mu.Unlock()
				if !maps.Equal(m, map[string]string{"exa": "exaai"}) {
					t.Errorf("mapping = %v", m)
				}
			}

			// An external change is picked up once its interval passed.
			ext.edit(func(f *fakeSource) { f.keys = f.keys[1:] })
			h.mustSync()
			if got := poolSnapshot(h.pool); got != want {
				t.Errorf("before the external interval: pool = %s, want %s", got, want)
			}
			h.clock.Add(30 * time.Second)
			h.mustSync()
			want = "exa[e1:active,ext_2:active] groq[g1:active] openai[k1:active,k2:active]"
			if got := poolSnapshot(h.pool); got != want {
				t.Errorf("after the external interval: pool = %s, want %s", got, want)
			}

			// External down: keys kept, still ready, logged once.
			ext.setFail(errors.New("external db gone"))
			for range 3 {
				h.clock.Add(30 * time.Second)
				h.mustSync()
			}
			st := h.sync.Status()
			if !st.Ready || !strings.Contains(st.ExternalError, "external db gone") {
				t.Errorf("status = %+v", st)
			}
			if got := poolSnapshot(h.pool); got != want {
				t.Errorf("during external outage: pool = %s, want %s", got, want)
			}
			// A primary change during the outage keeps the external keys.
			h.src.edit(func(f *fakeSource) { f.keys = append(f.keys, syncKey("exa", "e2", "exa-own-2")) })
			h.mustSync()
			want = "exa[e1:active,e2:active,ext_2:active] groq[g1:active] openai[k1:active,k2:active]"
			if got := poolSnapshot(h.pool); got != want {
				t.Errorf("primary change during external outage: pool = %s, want %s", got, want)
			}
			ext.setFail(nil)
			h.clock.Add(30 * time.Second)
			h.mustSync()
			if n := h.logs.count("external key source unreachable"); n != 1 {
				t.Errorf("external outage lines = %d, want 1", n)
			}
			if n := h.logs.count("external key source reachable again"); n != 1 {
				t.Errorf("external recovery lines = %d, want 1", n)
			}
			if st := h.sync.Status(); st.ExternalError != "" || st.Keys != 6 || st.Services != 3 {
				t.Errorf("status after recovery = %+v", st)
			}

			// Dropping the external name drops the external keys.
			h.src.edit(func(f *fakeSource) { f.services["exa"] = syncSvc("exa") })
			h.mustSync()
			want = "exa[e1:active,e2:active] groq[g1:active] openai[k1:active,k2:active]"
			if got := poolSnapshot(h.pool); got != want {
				t.Errorf("after dropping external_name: pool = %s, want %s", got, want)
			}
		})
	}
}

func TestSyncerTriggerCoalesces(t *testing.T) {
	h := newSyncHarness(t, SyncerOptions{Interval: time.Hour})
	syncSeed(h.src)
	for range 100 {
		h.sync.Trigger()
	}
	if n := len(h.sync.trig); n != 1 {
		t.Fatalf("pending triggers = %d, want 1", n)
	}
	<-h.sync.trig

	// Block Run's first check, trigger many times meanwhile: exactly one
	// more check follows.
	h.src.entered = make(chan struct{})
	h.src.gate = make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- h.sync.Run(context.Background()) }()
	<-h.src.entered // first check is in Version
	for range 100 {
		h.sync.Trigger()
	}
	h.src.gate <- struct{}{}
	<-h.src.entered // the one coalesced trigger
	if n := len(h.sync.trig); n != 0 {
		t.Errorf("pending triggers = %d, want 0", n)
	}
	h.sync.Close()
	h.src.gate <- struct{}{}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run = %v, want nil after Close", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after Close")
	}
	if v, _ := h.src.calls(); v != 2 {
		t.Errorf("version checks = %d, want 2", v)
	}
}

// fakeListener hands its fn to the test and blocks until ctx ends.
type fakeListener struct {
	fns    chan func()
	err    error
	exited chan struct{}
}

func (l *fakeListener) Listen(ctx context.Context, fn func()) error {
	defer close(l.exited)
	if l.err != nil {
		return l.err
	}
	l.fns <- fn
	<-ctx.Done()
	return ctx.Err()
}

func syncWait(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestSyncerRunNotify(t *testing.T) {
	l := &fakeListener{fns: make(chan func(), 1), exited: make(chan struct{})}
	h := newSyncHarness(t, SyncerOptions{Interval: time.Hour, Notify: l})
	syncSeed(h.src)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.sync.Run(ctx) }()
	notify := <-l.fns
	syncWait(t, "initial load", h.sync.Ready)

	h.src.edit(func(f *fakeSource) { f.keys = append(f.keys, syncKey("groq", "g2", "gsk-2")) })
	notify()
	want := "groq[g1:active,g2:active] openai[k1:active,k2:active]"
	syncWait(t, "notified change", func() bool { return poolSnapshot(h.pool) == want })

	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run = %v, want context.Canceled", err)
	}
	select {
	case <-l.exited:
	default:
		t.Error("Run returned before its listener ended")
	}
}

func TestSyncerListenUnsupported(t *testing.T) {
	l := &fakeListener{err: errors.ErrUnsupported, exited: make(chan struct{})}
	h := newSyncHarness(t, SyncerOptions{Interval: time.Hour, Notify: l})
	syncSeed(h.src)
	done := make(chan error, 1)
	go func() { done <- h.sync.Run(context.Background()) }()
	syncWait(t, "listener exit", func() bool { return h.logs.count("not supported; polling only") == 1 })
	syncWait(t, "initial load", h.sync.Ready)
	h.sync.Close()
	if err := <-done; err != nil {
		t.Errorf("Run = %v", err)
	}
}

func TestToPool(t *testing.T) {
	base := Service{
		Name: "svc", BaseURL: "https://api.example", AuthScheme: "header:x-goog-api-key",
		RateLimitRPM: 60, MaxInFlight: 4, Selector: "weighted",
		ProxyHeaders: map[string]string{"Cartesia-Version": "2024-06-10"},
		KeyPolicy:    KeyPolicy{RetryAfterCap: 900, ConfirmRefusals: 5, MinActiveKeys: 2, MaxEjectionPercent: 25},
	}
	k := Key{
		ID: "k1", Service: "svc", Secret: "s3cret", Weight: 3, Priority: 2, RateLimitRPM: 30, MaxInFlight: 2,
		Labels: map[string]string{"feature": "image-gen"}, BalanceTotal: 5, BalanceUsed: 1.5, BalanceUnit: "usd",
		Status: StatusActive, Tier: "pro", Features: map[string]int{"image-generation": 100},
	}
	ps, pk, err := ToPool(base, []Key{k})
	if err != nil {
		t.Fatal(err)
	}
	if ps.Name != "svc" || ps.BaseURL != base.BaseURL || ps.RateLimitRPM != 60 || ps.MaxInFlight != 4 ||
		ps.Auth.Name() != "header:x-goog-api-key" || ps.Headers["Cartesia-Version"] != "2024-06-10" {
		t.Errorf("service = %+v", ps)
	}
	if ps.RetryAfterCap != 15*time.Minute || ps.ConfirmRefusals != 5 || ps.MinActiveKeys != 2 || ps.MaxEjectionPercent != 25 {
		t.Errorf("key policy = %v %d %d %d", ps.RetryAfterCap, ps.ConfirmRefusals, ps.MinActiveKeys, ps.MaxEjectionPercent)
	}
	if _, ok := ps.Selector.(keypool.Weighted); !ok {
		t.Errorf("selector = %T", ps.Selector)
	}
	want := keypool.Key{
		ID: "k1", Secret: "s3cret", Weight: 3, Priority: 2, RateLimitRPM: 30, MaxInFlight: 2,
		Labels: map[string]string{"feature": "image-gen"}, BalanceTotal: 5, BalanceUsed: 1.5, BalanceUnit: "usd",
	}
	if len(pk) != 1 || pk[0].ID != want.ID || pk[0].Secret != want.Secret || pk[0].Weight != 3 || pk[0].Priority != 2 ||
		pk[0].RateLimitRPM != 30 || pk[0].MaxInFlight != 2 || !maps.Equal(pk[0].Labels, want.Labels) ||
		pk[0].BalanceTotal != 5 || pk[0].BalanceUsed != 1.5 || pk[0].BalanceUnit != "usd" || pk[0].State != keypool.StateActive {
		t.Errorf("key = %+v", pk[0])
	}
	if pk[0].Features["image-generation"] != 100 || len(pk[0].Features) != 1 {
		t.Errorf("key features = %v, want the tier's image-generation 100", pk[0].Features)
	}
	base.ProxyHeaders["Cartesia-Version"] = "changed"
	if ps.Headers["Cartesia-Version"] != "2024-06-10" {
		t.Error("headers not copied")
	}

	states := []struct {
		status, reason string
		want           keypool.State
		wantReason     string
	}{
		{"", "", keypool.StateActive, ""},
		{StatusActive, "", keypool.StateActive, ""},
		{StatusDisabled, "paused by admin", keypool.StateDisabled, "paused by admin"},
		{StatusInvalid, "401", keypool.StateInvalid, "401"},
		{StatusExhausted, "quota", keypool.StateExhausted, "quota"},
		{"banned", "", keypool.StateDisabled, `unknown stored status "banned"`},
	}
	for _, tt := range states {
		t.Run("status "+tt.status, func(t *testing.T) {
			k := k
			k.Status, k.StatusReason = tt.status, tt.reason
			_, pk, err := ToPool(base, []Key{k})
			if err != nil {
				t.Fatal(err)
			}
			if pk[0].State != tt.want || pk[0].Reason != tt.wantReason {
				t.Errorf("state = %s %q, want %s %q", pk[0].State, pk[0].Reason, tt.want, tt.wantReason)
			}
		})
	}

	bad := []struct{ name, auth, sel string }{
		{"auth scheme", "carrier-pigeon", ""},
		{"selector", "bearer", "fastest"},
	}
	for _, tt := range bad {
		t.Run("bad "+tt.name, func(t *testing.T) {
			s := base
			s.AuthScheme, s.Selector = tt.auth, tt.sel
			_, _, err := ToPool(s, nil)
			if !errors.Is(err, keypool.ErrInvalidConfig) || !strings.Contains(err.Error(), `"svc"`) {
				t.Errorf("err = %v", err)
			}
		})
	}
}

// TestSyncerRecoveryLogsOutageAsDuration: the "reachable again" line gives
// the outage as a duration ("8s"), not as nanoseconds, in the JSON logs
// keypoold writes by default.
func TestSyncerRecoveryLogsOutageAsDuration(t *testing.T) {
	logs := &syncLog{}
	h := newSyncHarness(t, SyncerOptions{Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	syncSeed(h.src)
	h.mustSync()
	down := errors.New("dial tcp 127.0.0.1:5432: connection refused")
	h.src.setFail(down)
	_ = h.sync.Sync(context.Background())
	h.clock.Add(8 * time.Second)
	h.src.setFail(nil)
	h.mustSync()
	if logs.count(`"down_for":"8s"`) != 1 {
		t.Errorf("recovery line does not give the outage as 8s:\n%s", logs.b.String())
	}
}
