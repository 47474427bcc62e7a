package auth

import (
	"strings"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2/simplelru"
)

// LoginLimiterConfig configures a [LoginLimiter]. Zero values pick the
// documented defaults.
type LoginLimiterConfig struct {
	// PerAddress bounds failed sign-ins from one address (any username):
	// if zero, 10 per minute.
	PerAddress FailureConfig `json:"per_address"`
	// PerUserAddress bounds failed sign-ins for one username from one
	// address: if zero, 5 per 15 minutes.
	PerUserAddress FailureConfig `json:"per_user_address"`
	// PerUser bounds failed sign-ins for one username from all addresses
	// together: if zero, 50 per 15 minutes. It does not apply to an
	// address that has signed in as that user before (see [LoginLimiter]).
	PerUser FailureConfig `json:"per_user"`
}

// LoginLimiter slows down password guessing against POST
// /admin/auth/login, per address and per username, without letting
// anyone lock a legitimate user out:
//
//   - per address: an address that keeps failing is refused for a while,
//     whatever username it tries; other addresses are not affected;
//   - per username and address: a username guessed from one address is
//     refused from that address only;
//   - per username: guesses spread over many addresses are refused too,
//     except from an address where that user has signed in successfully
//     before (remembered in a bounded LRU), so that the real user, from
//     their usual address, still gets in during an attack.
//
// A refused attempt is refused before its password is checked, even when
// the password is right. It is safe for concurrent use and must not be
// copied.
type LoginLimiter struct {
	addr, pair, user *FailureLimiter

	mu    sync.Mutex // protects known
	known *lru.LRU[string, struct{}]
}

// NewLoginLimiter returns a LoginLimiter.
func NewLoginLimiter(cfg LoginLimiterConfig) *LoginLimiter {
	def := func(c FailureConfig, max int, window time.Duration) FailureConfig {
		if c.Max <= 0 {
			c.Max = max
		}
		if c.Window <= 0 {
			c.Window = window
		}
		return c
	}
	known, _ := lru.NewLRU[string, struct{}](10000, nil)
	return &LoginLimiter{
		addr:  NewFailureLimiter(def(cfg.PerAddress, 10, time.Minute)),
		pair:  NewFailureLimiter(def(cfg.PerUserAddress, 5, 15*time.Minute)),
		user:  NewFailureLimiter(def(cfg.PerUser, 50, 15*time.Minute)),
		known: known,
	}
}

func userKey(username string) string { return strings.ToLower(username) }

func pairKey(username, addr string) string { return userKey(username) + "\x00" + addr }

// Check reports whether a sign-in as username from addr may be tried at
// now; when it may not, retryAfter says how long until it may.
func (l *LoginLimiter) Check(username, addr string, now time.Time) (retryAfter time.Duration, ok bool) {
	if d, ok := l.addr.Check(addr, now); !ok {
		return d, false
	}
	if d, ok := l.pair.Check(pairKey(username, addr), now); !ok {
		return d, false
	}
	l.mu.Lock()
	_, known := l.known.Get(pairKey(username, addr))
	l.mu.Unlock()
	if !known {
		if d, ok := l.user.Check(userKey(username), now); !ok {
			return d, false
		}
	}
	return 0, true
}

// Fail records a failed sign-in as username from addr.
func (l *LoginLimiter) Fail(username, addr string, now time.Time) {
	l.addr.Fail(addr, now)
	l.pair.Fail(pairKey(username, addr), now)
	l.user.Fail(userKey(username), now)
}

// Succeed records a successful sign-in: it forgets the address's failures
// for that username and remembers the address as one the user signs in
// from.
func (l *LoginLimiter) Succeed(username, addr string) {
	l.pair.Reset(pairKey(username, addr))
	l.mu.Lock()
	l.known.Add(pairKey(username, addr), struct{}{})
	l.mu.Unlock()
}
