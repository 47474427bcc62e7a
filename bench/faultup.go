package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// maxKeys bounds the keys a scenario may give the stand-in upstream.
const maxKeys = 64

// keySecret is the upstream key value of key i; the stand-in upstream
// tells keys apart by it.
func keySecret(i int) string { return fmt.Sprintf("sk-fault-%02d-0123456789abcdef", i) }

// keyIndex returns the index of the key an upstream request carries, or
// -1.
func keyIndex(r *http.Request) int {
	v := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !strings.HasPrefix(v, "sk-fault-") || len(v) < len("sk-fault-00") {
		return -1
	}
	i, err := strconv.Atoi(v[len("sk-fault-") : len("sk-fault-")+2])
	if err != nil || i < 0 || i >= maxKeys {
		return -1
	}
	return i
}

// behaviour answers one upstream attempt for key k. It reports whether
// the answer was a 2xx that was fully written.
type behaviour func(w http.ResponseWriter, r *http.Request, k int) bool

// upstream is the stand-in provider: a real HTTP server on loopback whose
// answers a scenario scripts, and which counts what reached it. It must
// not be copied.
type upstream struct {
	url      string
	srv      *http.Server
	behave   behaviour
	attempts atomic.Int64 // every request that reached it
	noID     atomic.Int64 // requests without X-Request-Id
	perKey   [maxKeys]atomic.Int64

	mu     sync.Mutex     // protects served and seen
	served map[string]int // request id → 2xx answers fully written
	seen   map[string]int // request id → attempts
}

// startUpstream serves b on a loopback port until close.
func startUpstream(b behaviour) (*upstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	u := &upstream{url: "http://" + ln.Addr().String(), behave: b, served: map[string]int{}, seen: map[string]int{}}
	u.srv = &http.Server{Handler: u, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = u.srv.Serve(ln) }()
	return u, nil
}

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	_, _ = io.Copy(io.Discard, r.Body)
	u.attempts.Add(1)
	id := r.Header.Get("X-Request-Id")
	if id == "" {
		u.noID.Add(1)
	}
	k := keyIndex(r)
	if k < 0 {
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = io.WriteString(w, `{"error":{"message":"unknown key","type":"invalid_request_error","code":"invalid_api_key"}}`)
		return
	}
	u.perKey[k].Add(1)
	u.mu.Lock()
	u.seen[id]++
	u.mu.Unlock()
	if u.behave(w, r, k) && id != "" {
		u.mu.Lock()
		u.served[id]++
		u.mu.Unlock()
	}
}

// servedIDs returns a copy of the request ids answered with a 2xx.
func (u *upstream) servedIDs() map[string]int {
	u.mu.Lock()
	defer u.mu.Unlock()
	m := make(map[string]int, len(u.served))
	for k, v := range u.served {
		m[k] = v
	}
	return m
}

// sawID reports whether a request with id reached the upstream.
func (u *upstream) sawID(id string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.seen[id] > 0
}

// closeIdle closes the upstream's idle keep-alive connections, so that
// keypoold's idle upstream connections do not count as leaks, and keeps
// keep-alives on for later requests.
func (u *upstream) closeIdle() {
	u.srv.SetKeepAlivesEnabled(false)
	u.srv.SetKeepAlivesEnabled(true)
}

func (u *upstream) close() { _ = u.srv.Close() }

// ---- answers ----

// okChat writes the chat completion after delay, unless the request is
// cancelled first; it reports whether the whole answer was written.
func okChat(w http.ResponseWriter, r *http.Request, delay time.Duration) bool {
	if delay > 0 {
		t := time.NewTimer(delay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-r.Context().Done():
			return false
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(chatBody)))
	if _, err := io.WriteString(w, chatBody); err != nil {
		return false
	}
	return http.NewResponseController(w).Flush() == nil
}

// errorAnswer writes an OpenAI-shaped error.
func errorAnswer(w http.ResponseWriter, status int, typ, code string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = fmt.Fprintf(w, `{"error":{"message":"stand-in upstream: %s","type":%q,"code":%q}}`, http.StatusText(status), typ, code)
}

// ---- the 429 storm: every key enforces its own limit ----

// retryForms are the ways a 429 says when to come back, in rotation.
var retryForms = []string{"Retry-After seconds", "Retry-After HTTP-date", "retry-after-ms", "x-ratelimit-reset-requests"}

// rateKey is one key's limit in the storm: limit requests per fixed
// window.
type rateKey struct {
	limit int
	win   int64 // index of the current window
	count int   // requests in it
}

// arrival is one request that reached the storm's upstream.
type arrival struct {
	key int
	at  time.Time
	id  string
}

// refusal is one 429 of the storm's upstream: to request id on key, at
// issued, announcing until.
type refusal struct {
	key           int
	form          int // index in retryForms
	id            string
	issued, until time.Time
}

// limiter is the storm's upstream: fixed windows of length window since
// t0, per key. Its 429s rotate through retryForms, each announcing the
// window's end rounded up to the form's resolution. It logs every
// arrival and refusal, so that [limiter.early] can tell which requests
// came to a key before the time it announced. It must not be copied.
type limiter struct {
	window time.Duration
	t0     time.Time

	mu       sync.Mutex // protects the fields below
	keys     []rateKey
	form     int
	by429    [4]int
	arrivals []arrival
	refusals []refusal
}

func newLimiter(limits []int, window time.Duration) *limiter {
	l := &limiter{window: window, t0: time.Now(), keys: make([]rateKey, len(limits))}
	for i, n := range limits {
		l.keys[i].limit = n
	}
	return l
}

func (l *limiter) behave(w http.ResponseWriter, r *http.Request, k int) bool {
	now := time.Now()
	id := r.Header.Get("X-Request-Id")
	l.mu.Lock()
	if k >= len(l.keys) {
		l.mu.Unlock()
		errorAnswer(w, http.StatusUnauthorized, "invalid_request_error", "invalid_api_key")
		return false
	}
	l.arrivals = append(l.arrivals, arrival{key: k, at: now, id: id})
	key := &l.keys[k]
	win := int64(now.Sub(l.t0) / l.window)
	if win != key.win {
		key.win, key.count = win, 0
	}
	key.count++
	if key.count <= key.limit {
		l.mu.Unlock()
		return okChat(w, r, 0)
	}
	reset := l.t0.Add(time.Duration(win+1) * l.window)
	form := l.form
	l.form = (l.form + 1) % len(retryForms)
	l.by429[form]++
	h := w.Header()
	wait := reset.Sub(now)
	var until time.Time
	switch form {
	case 0:
		secs := int64((wait + time.Second - 1) / time.Second)
		h.Set("Retry-After", strconv.FormatInt(secs, 10))
		until = now.Add(time.Duration(secs) * time.Second)
	case 1:
		date := reset.Truncate(time.Second)
		if date.Before(reset) {
			date = date.Add(time.Second)
		}
		h.Set("Retry-After", date.UTC().Format(http.TimeFormat))
		until = date
	case 2:
		ms := int64((wait + time.Millisecond - 1) / time.Millisecond)
		h.Set("Retry-After-Ms", strconv.FormatInt(ms, 10))
		until = now.Add(time.Duration(ms) * time.Millisecond)
	case 3:
		ms := int64((wait + time.Millisecond - 1) / time.Millisecond)
		h.Set("X-Ratelimit-Remaining-Requests", "0")
		h.Set("X-Ratelimit-Reset-Requests", strconv.FormatInt(ms, 10)+"ms")
		until = now.Add(time.Duration(ms) * time.Millisecond)
	}
	l.refusals = append(l.refusals, refusal{key: k, form: form, id: id, issued: now, until: until})
	l.mu.Unlock()
	errorAnswer(w, http.StatusTooManyRequests, "requests", "rate_limit_exceeded")
	return false
}

// earlyCounts are the storm's requests that reached a key before the
// time one of its 429s announced.
type earlyCounts struct {
	// Strict counts requests that keypoold sent, certainly after it had
	// read a 429 of the key, and that reached the key before the time
	// that 429 announced: before the longest Retry-After in force.
	Strict int
	// ByForm splits Strict by the form of that 429 (the one announcing
	// the latest time).
	ByForm [4]int
	// Latest counts the requests that reached a key before the time of
	// the latest 429 keypoold had certainly read (the upstream's latest
	// word; the seconds and HTTP-date forms round up, so an earlier 429
	// may announce a later time than a later one), unless a later 429,
	// which keypoold may have read, allowed it.
	Latest int
	// OnWire counts the requests that reached a key before an announced
	// time but may have been sent before keypoold read that 429.
	OnWire int
}

// early counts the requests that reached a key before the time a 429 of
// that key announced, when keypoold had certainly read that 429 before
// sending them: the refused request's client had its answer before the
// arriving request's client sent it (done and started hold those times
// by request id), or the arriving request is a later attempt of the
// refused request itself, or it was sent after such a later attempt
// arrived. Arrival times are the upstream's, so a request delayed on
// its way only looks earlier, never later.
func (l *limiter) early(done, started map[string]time.Time) earlyCounts {
	l.mu.Lock()
	defer l.mu.Unlock()
	// known[i] is a time by which keypoold had read refusal i.
	known := make([]time.Time, len(l.refusals))
	byKey := map[int][]int{}
	byID := map[string][]int{}
	for i, f := range l.refusals {
		known[i] = done[f.id]
		byKey[f.key] = append(byKey[f.key], i)
		if f.id != "" {
			byID[f.id] = append(byID[f.id], i)
		}
	}
	for _, a := range l.arrivals {
		for _, i := range byID[a.id] {
			if f := l.refusals[i]; a.at.After(f.issued) && (known[i].IsZero() || a.at.Before(known[i])) {
				known[i] = a.at
			}
		}
	}
	var c earlyCounts
	for _, a := range l.arrivals {
		sent, hasSent := started[a.id]
		isKnown := func(i int) bool {
			f := l.refusals[i]
			if a.id != "" && a.id == f.id {
				return true // a later attempt of the refused request
			}
			return hasSent && !known[i].IsZero() && sent.After(known[i])
		}
		strict, latest := -1, -1
		var unknown []int
		for _, i := range byKey[a.key] {
			f := l.refusals[i]
			if !a.at.After(f.issued) {
				continue
			}
			if !isKnown(i) {
				unknown = append(unknown, i)
				continue
			}
			if a.at.Before(f.until) && (strict < 0 || f.until.After(l.refusals[strict].until)) {
				strict = i
			}
			if latest < 0 || f.issued.After(l.refusals[latest].issued) {
				latest = i
			}
		}
		if strict >= 0 {
			c.Strict++
			c.ByForm[l.refusals[strict].form]++
		}
		sure := latest >= 0 && a.at.Before(l.refusals[latest].until)
		maybe := false
		for _, i := range unknown {
			f := l.refusals[i]
			if latest >= 0 && !f.issued.After(l.refusals[latest].issued) {
				if strict < 0 && a.at.Before(f.until) {
					maybe = true // an earlier 429, maybe not read yet, forbade it
				}
				continue
			}
			if a.at.Before(f.until) {
				maybe = true
			} else if sure {
				sure = false // a later 429, maybe read already, allowed it
			}
		}
		if sure {
			c.Latest++
		}
		if maybe && strict < 0 {
			c.OnWire++
		}
	}
	return c
}

// ---- SSE streams ----

// sseStream answers a streamed chat completion: events chunks gap apart,
// then a usage chunk and [DONE]. It counts the streams whose client
// (keypoold) went away before the end.
type sseStream struct {
	events int
	gap    time.Duration
	cut    atomic.Int64
	done   atomic.Int64
}

func (s *sseStream) behave(w http.ResponseWriter, r *http.Request, _ int) bool {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	rc := http.NewResponseController(w)
	t := time.NewTicker(s.gap)
	defer t.Stop()
	for i := range s.events {
		if _, err := fmt.Fprintf(w, "data: {\"id\":\"chatcmpl-f\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok%d \"}}]}\n\n", i); err != nil {
			s.cut.Add(1)
			return false
		}
		if err := rc.Flush(); err != nil {
			s.cut.Add(1)
			return false
		}
		select {
		case <-t.C:
		case <-r.Context().Done():
			s.cut.Add(1)
			return false
		}
	}
	_, _ = io.WriteString(w, "data: {\"id\":\"chatcmpl-f\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":20,\"total_tokens\":32}}\n\n")
	_, err := io.WriteString(w, "data: [DONE]\n\n")
	if err != nil || rc.Flush() != nil {
		s.cut.Add(1)
		return false
	}
	s.done.Add(1)
	return true
}

// waitCtx sleeps d or until ctx ends.
func waitCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}
