// Package auth authenticates keypoold's clients and its operator: team
// tokens (random "kp_…" strings, stored only as a SHA-256 hash) and the
// single admin token.
//
// # Two kinds of credential
//
// The admin token opens the admin plane (/admin/*, and key leasing); team
// tokens open the data plane (/v1/{service}/…, and key leasing when the
// token has the "lease" scope). Neither opens the other's plane:
// [Authenticator.Authenticate] never accepts the admin token, and
// [Authenticator.IsAdmin] accepts nothing else.
//
// # Caching and revocation
//
// [Authenticator.Authenticate] caches what it reads from the store (token,
// team and user) in a bounded LRU (github.com/hashicorp/golang-lru/v2
// expirable) for [Config.CacheTTL], 5 s by default, and caches unknown
// tokens for a shorter time ([Config.NegativeTTL], 1 s) so that a flood of
// bad tokens does not reach the database. IsActive and ExpiresAt are
// checked on every call against the cached record, so an expiry takes
// effect to the second. A token revoked or deleted through the admin API
// stops working at once on the replica that served the admin call (which
// calls [Authenticator.Invalidate]) and within CacheTTL on every other
// replica sharing the database: that is the documented bound. Every
// invalidation is reported to [Config.OnInvalidate], through which
// keypoold ends the open streams of a revoked token, team or user.
//
// # Secrets
//
// No error, log line or String form carries a token or the admin token;
// errors name at most a token's stored prefix ("kp_AbC12").
//
// # Admin users
//
// [Sessions] signs admin users in with a username and an argon2id-hashed
// password ([HashPassword], [CheckPassword]), throttled by a
// [LoginLimiter], and checks the session tokens ("kps_…", stored only as a
// SHA-256) that the admin API and the console accept.
//
// Everything here is safe for concurrent use.
package auth

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"golang.org/x/sync/singleflight"

	"github.com/keypool/keypool/store"
)

// Errors returned by [Authenticator.Authenticate], wrapped with %w. The
// server answers all three with 401 invalid_token.
var (
	// ErrInvalidToken means no client token was given, it is malformed, or
	// no token has that hash (or its team is gone).
	ErrInvalidToken = errors.New("auth: invalid token")
	// ErrExpired means the token's ExpiresAt has passed.
	ErrExpired = errors.New("auth: token expired")
	// ErrInactive means the token was revoked (IsActive is false).
	ErrInactive = errors.New("auth: token revoked")
)

// Scope names a [store.Token] can carry.
const (
	// ScopeLease lets a team token lease raw keys (GET /key).
	ScopeLease = "lease"
)

// Config configures an [Authenticator]. Zero values pick the documented
// defaults.
type Config struct {
	// AdminToken is the admin bearer token. If empty, no request is an
	// admin request.
	AdminToken string `json:"-"`
	// CacheTTL is how long a token read from the store is trusted before
	// it is read again: the bound on how long a token revoked on another
	// replica keeps working. If zero, 5s; negative disables the cache.
	CacheTTL time.Duration `json:"cache_ttl,omitempty"`
	// NegativeTTL is how long an unknown token is remembered as unknown.
	// If zero, 1s (at most CacheTTL).
	NegativeTTL time.Duration `json:"negative_ttl,omitempty"`
	// CacheSize bounds the cache (known and unknown tokens together). If
	// zero, 10000.
	CacheSize int `json:"cache_size,omitempty"`
	// Now returns the current time. If nil, time.Now.
	Now func() time.Time `json:"-"`
	// OnInvalidate, if set, is called after each invalidation, outside
	// any lock, with what was invalidated: scope "token", "team" or "user"
	// and its id, or "all" and "" for [Authenticator.Purge]. Whoever
	// feeds the cache its invalidations (the admin API, a change channel
	// from other replicas) thereby reaches it too: keypoold re-checks the
	// open streams of that token, team or user and ends the revoked ones.
	OnInvalidate func(scope, id string) `json:"-"`
}

// String describes the configuration without the admin token.
func (c Config) String() string {
	return fmt.Sprintf("auth.Config{AdminToken:%s CacheTTL:%s NegativeTTL:%s CacheSize:%d}",
		redact(c.AdminToken), c.CacheTTL, c.NegativeTTL, c.CacheSize)
}

// GoString is String, so %#v does not print the admin token either.
func (c Config) GoString() string { return c.String() }

func redact(s string) string {
	if s == "" {
		return `""`
	}
	return "[redacted]"
}

// Principal is who made a request: the admin, or a client token with its
// team (and user, for a user's token). Its slices and maps are shared with
// the cache: do not modify them.
type Principal struct {
	// Admin reports whether the request carried the admin token; Token and
	// Team are then zero.
	Admin bool
	Token store.Token
	Team  store.Team
	// User is the token's user, or nil for a team token.
	User *store.User
}

// HasScope reports whether the principal may do what scope names: the
// admin may do everything, a token what its Scopes list.
func (p *Principal) HasScope(scope string) bool {
	return p.Admin || slices.Contains(p.Token.Scopes, scope)
}

// Limits returns the limits that apply to the principal's requests: the
// team's (shared by every token of the team) and the token's own. A zero
// field means no limit at that level; both levels apply.
func (p *Principal) Limits() (team, token store.Limits) {
	return p.Team.Limits, p.Token.Limits
}

// AllowsService reports whether the principal may use service: the admin
// always, a client when its team's AllowedServices is empty or lists it.
func (p *Principal) AllowsService(service string) bool {
	return p.Admin || len(p.Team.AllowedServices) == 0 || slices.Contains(p.Team.AllowedServices, service)
}

// AllowsModel reports whether the principal may call model: every
// non-empty ModelsEnabled list (team, token) must contain it.
func (p *Principal) AllowsModel(model string) bool {
	if p.Admin {
		return true
	}
	for _, l := range [...][]string{p.Team.ModelsEnabled, p.Token.ModelsEnabled} {
		if len(l) > 0 && !slices.Contains(l, model) {
			return false
		}
	}
	return true
}

// entry is a cached lookup: a principal, or a token known not to exist.
type entry struct {
	p       *Principal // nil: unknown token
	fetched time.Time
}

// Authenticator checks tokens. Create it with [New]; it is safe for
// concurrent use and must not be copied.
//
// Its cache (golang-lru/v2 expirable) runs one background goroutine that
// reaps expired entries; that library offers no way to stop it, so create
// one Authenticator per process, not one per request.
type Authenticator struct {
	st       TokenStore
	cfg      Config
	now      func() time.Time
	adminSum [sha256.Size]byte
	hasAdmin bool
	cache    *expirable.LRU[[sha256.Size]byte, entry] // nil when disabled
	group    singleflight.Group
	// gen counts invalidations: a lookup that raced with one is not
	// cached, so a revocation cannot be undone by a read that began
	// before it.
	gen atomic.Uint64
	// mu orders cache additions against invalidations (a gen check and
	// the Add it guards happen together); no I/O runs under it.
	mu sync.Mutex
}

// TokenStore is what an [Authenticator] reads: a token by its hash, and
// its user and team. Every [store.Store] is one.
type TokenStore interface {
	GetTokenByHash(ctx context.Context, hash []byte) (store.Token, error)
	GetUser(ctx context.Context, id string) (store.User, error)
	GetTeam(ctx context.Context, id string) (store.Team, error)
}

// New returns an Authenticator reading tokens from st.
func New(st TokenStore, cfg Config) *Authenticator {
	if cfg.CacheTTL == 0 {
		cfg.CacheTTL = 5 * time.Second
	}
	if cfg.NegativeTTL <= 0 {
		cfg.NegativeTTL = time.Second
	}
	if cfg.CacheTTL > 0 && cfg.NegativeTTL > cfg.CacheTTL {
		cfg.NegativeTTL = cfg.CacheTTL
	}
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = 10000
	}
	a := &Authenticator{st: st, cfg: cfg, now: cfg.Now}
	if a.now == nil {
		a.now = time.Now
	}
	if cfg.AdminToken != "" {
		a.adminSum, a.hasAdmin = sha256.Sum256([]byte(cfg.AdminToken)), true
		a.cfg.AdminToken = "" // only its hash is needed from here on
	}
	if cfg.CacheTTL > 0 {
		a.cache = expirable.NewLRU[[sha256.Size]byte, entry](cfg.CacheSize, nil, cfg.CacheTTL)
	}
	return a
}

// IsAdmin reports whether token is the admin token. It compares SHA-256
// hashes in constant time, so neither the token's content nor its length
// leaks through timing.
func (a *Authenticator) IsAdmin(token string) bool {
	if !a.hasAdmin || token == "" {
		return false
	}
	sum := tokenSum(token)
	return subtle.ConstantTimeCompare(sum[:], a.adminSum[:]) == 1
}

// Authenticate returns the principal of a client token. Its errors wrap
// [ErrInvalidToken], [ErrExpired] or [ErrInactive]; any other error means
// the store could not be read (answer 503) and is not cached. The admin
// token is not a client token: it gets ErrInvalidToken here (check
// [Authenticator.IsAdmin] where the admin is welcome).
func (a *Authenticator) Authenticate(ctx context.Context, token string) (*Principal, error) {
	if !wellFormed(token) {
		return nil, ErrInvalidToken
	}
	sum := tokenSum(token)
	now := a.now()
	e, ok := a.cached(sum, now)
	if !ok {
		v, err, _ := a.group.Do(string(sum[:]), func() (any, error) {
			// Shared by every caller waiting on this token: one caller
			// going away must not fail the others.
			lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			return a.load(lctx, sum)
		})
		if err != nil {
			return nil, err
		}
		e = v.(entry)
	}
	if e.p == nil {
		return nil, ErrInvalidToken
	}
	if !e.p.Token.IsActive {
		return nil, fmt.Errorf("%w: %s", ErrInactive, e.p.Token.Prefix)
	}
	if exp := e.p.Token.ExpiresAt; exp != nil && !now.Before(*exp) {
		return nil, fmt.Errorf("%w: %s", ErrExpired, e.p.Token.Prefix)
	}
	p := *e.p
	return &p, nil
}

// sumBufs holds the buffers tokenSum copies a token into: sha256.Sum256
// keeps its argument, so hashing []byte(token) would allocate a copy per
// request.
var sumBufs = sync.Pool{New: func() any { return new([]byte) }}

// maxPooledToken bounds the buffers sumBufs keeps, so one huge header does
// not stay in memory.
const maxPooledToken = 512

// tokenSum is the SHA-256 of token, hashed from a pooled copy.
func tokenSum(token string) [sha256.Size]byte {
	bp := sumBufs.Get().(*[]byte)
	b := append((*bp)[:0], token...)
	sum := sha256.Sum256(b)
	clear(b) // the buffer outlives the request: keep no token in it
	if cap(b) <= maxPooledToken {
		*bp = b
		sumBufs.Put(bp)
	}
	return sum
}

// cached returns a fresh cache entry for sum.
func (a *Authenticator) cached(sum [sha256.Size]byte, now time.Time) (entry, bool) {
	if a.cache == nil {
		return entry{}, false
	}
	e, ok := a.cache.Get(sum)
	if !ok {
		return entry{}, false
	}
	ttl := a.cfg.CacheTTL
	if e.p == nil {
		ttl = a.cfg.NegativeTTL
	}
	if age := now.Sub(e.fetched); age < 0 || age >= ttl {
		return entry{}, false
	}
	return e, true
}

// load reads a token, its team and its user from the store and caches the
// result.
func (a *Authenticator) load(ctx context.Context, sum [sha256.Size]byte) (entry, error) {
	gen := a.gen.Load()
	e := entry{fetched: a.now()}
	tok, err := a.st.GetTokenByHash(ctx, sum[:])
	switch {
	case errors.Is(err, store.ErrNotFound):
		a.add(sum, e, gen)
		return e, nil
	case err != nil:
		return e, fmt.Errorf("auth: look up token: %w", err)
	}
	p := &Principal{Token: tok}
	if tok.UserID != "" {
		u, err := a.st.GetUser(ctx, tok.UserID)
		switch {
		case errors.Is(err, store.ErrNotFound):
			a.add(sum, e, gen)
			return e, nil
		case err != nil:
			return e, fmt.Errorf("auth: look up user of token %s: %w", tok.Prefix, err)
		}
		p.User = &u
		// A user's token counts against the user's (current) team.
		p.Token.TeamID = u.TeamID
	}
	team, err := a.st.GetTeam(ctx, p.Token.TeamID)
	switch {
	case errors.Is(err, store.ErrNotFound):
		a.add(sum, e, gen)
		return e, nil
	case err != nil:
		return e, fmt.Errorf("auth: look up team of token %s: %w", tok.Prefix, err)
	}
	p.Team = team
	e.p = p
	a.add(sum, e, gen)
	return e, nil
}

func (a *Authenticator) add(sum [sha256.Size]byte, e entry, gen uint64) {
	if a.cache == nil {
		return
	}
	a.mu.Lock()
	if a.gen.Load() == gen {
		a.cache.Add(sum, e)
	}
	a.mu.Unlock()
}

// Invalidate drops the cached token with this id, so that a change to it
// (revocation, new limits, deletion) takes effect on this replica at once.
// Other replicas see it within [Config.CacheTTL].
func (a *Authenticator) Invalidate(tokenID string) {
	a.invalidateWhere(func(p *Principal) bool { return p.Token.ID == tokenID })
	a.notify("token", tokenID)
}

// notify calls Config.OnInvalidate.
func (a *Authenticator) notify(scope, id string) {
	if a.cfg.OnInvalidate != nil {
		a.cfg.OnInvalidate(scope, id)
	}
}

// InvalidateHash drops the cached token whose hash ([Hash]) is hash, known
// or unknown.
func (a *Authenticator) InvalidateHash(hash []byte) {
	if a.cache == nil || len(hash) != sha256.Size {
		return
	}
	a.mu.Lock()
	a.gen.Add(1)
	a.cache.Remove([sha256.Size]byte(hash))
	a.mu.Unlock()
}

// InvalidateTeam drops every cached token of a team (after its limits
// change or it is deleted).
func (a *Authenticator) InvalidateTeam(teamID string) {
	a.invalidateWhere(func(p *Principal) bool { return p.Token.TeamID == teamID || p.Team.ID == teamID })
	a.notify("team", teamID)
}

// InvalidateUser drops every cached token of a user.
func (a *Authenticator) InvalidateUser(userID string) {
	a.invalidateWhere(func(p *Principal) bool { return p.Token.UserID == userID })
	a.notify("user", userID)
}

// Purge empties the cache.
func (a *Authenticator) Purge() {
	if a.cache != nil {
		a.mu.Lock()
		a.gen.Add(1)
		a.cache.Purge()
		a.mu.Unlock()
	}
	a.notify("all", "")
}

// invalidateWhere removes matching entries. It walks the cache (at most
// CacheSize entries): admin changes are rare, lookups are not, so the
// cache keeps no secondary index.
func (a *Authenticator) invalidateWhere(match func(*Principal) bool) {
	if a.cache == nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.gen.Add(1)
	for _, k := range a.cache.Keys() {
		if e, ok := a.cache.Peek(k); ok && e.p != nil && match(e.p) {
			a.cache.Remove(k)
		}
	}
}
