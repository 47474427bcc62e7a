package limit

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// RateWindow is the length of the sliding window behind [Limiter.Allow] and
// behind [Minute] limits: one minute.
const RateWindow = time.Minute

// Errors returned by this package. Backend failures are not errors on the
// admission path: they come back as a [Decision] with Degraded set, allowed
// or refused per the backend's fail policy.
var (
	// ErrInvalidLimit reports a [Limit] with an unknown [Window] or a
	// negative threshold, or a negative amount.
	ErrInvalidLimit = errors.New("limit: invalid limit")
	// ErrUnavailable reports that the shared backend (Redis) could not be
	// reached in time. It is returned, wrapped, by Settle, Add and Usage.
	ErrUnavailable = errors.New("limit: backend unavailable")
)

// Window names the period a [Limit] counts over.
//
// Minute is a sliding window: usage charged at time t counts while
// now < t+[RateWindow] for requests, and at one-second granularity for
// amounts (an amount charged during second s counts until second s+61
// starts, so at least 60 s). Hour, Day and Month are calendar periods in
// UTC: the hour, day or month in UTC that contains now (see [WindowBounds]).
// Total never resets.
type Window uint8

// Windows. The zero Window is invalid.
const (
	Minute Window = iota + 1
	Hour
	Day
	Month
	Total
)

var windowNames = [...]string{"", "minute", "hour", "day", "month", "total"}

// String returns the window's name: "minute", "hour", "day", "month" or
// "total".
func (w Window) String() string {
	if w.valid() {
		return windowNames[w]
	}
	return fmt.Sprintf("Window(%d)", uint8(w))
}

func (w Window) valid() bool { return w >= Minute && w <= Total }

// ParseWindow returns the Window named s (as printed by [Window.String]).
func ParseWindow(s string) (Window, error) {
	for i := Minute; i <= Total; i++ {
		if windowNames[i] == s {
			return i, nil
		}
	}
	return 0, fmt.Errorf("%w: unknown window %q", ErrInvalidLimit, s)
}

// MarshalText implements [encoding.TextMarshaler].
func (w Window) MarshalText() ([]byte, error) {
	if !w.valid() {
		return nil, fmt.Errorf("%w: window %d", ErrInvalidLimit, uint8(w))
	}
	return []byte(windowNames[w]), nil
}

// UnmarshalText implements [encoding.TextUnmarshaler].
func (w *Window) UnmarshalText(b []byte) error {
	v, err := ParseWindow(string(b))
	if err != nil {
		return err
	}
	*w = v
	return nil
}

// WindowBounds returns the window of kind w that contains now, as the
// half-open interval [start, end). Calendar windows (Hour, Day, Month) are
// aligned in UTC whatever now's location; the results are in UTC. Minute
// returns the sliding window (now-[RateWindow], now]. Total returns two zero
// times: it has no start and never ends. An invalid w also returns zero times.
func WindowBounds(w Window, now time.Time) (start, end time.Time) {
	u := now.UTC()
	switch w {
	case Minute:
		return u.Add(-RateWindow), u
	case Hour:
		start = time.Date(u.Year(), u.Month(), u.Day(), u.Hour(), 0, 0, 0, time.UTC)
		return start, start.Add(time.Hour)
	case Day:
		start = time.Date(u.Year(), u.Month(), u.Day(), 0, 0, 0, 0, time.UTC)
		return start, start.AddDate(0, 0, 1)
	case Month:
		start = time.Date(u.Year(), u.Month(), 1, 0, 0, 0, 0, time.UTC)
		return start, start.AddDate(0, 1, 0)
	}
	return time.Time{}, time.Time{}
}

// calStart returns the Unix second at which the calendar window w (Hour,
// Day or Month) containing now starts, in UTC, by arithmetic on the Unix
// second (no [time.Time] is built: every counter charge asks it for all
// three windows).
func calStart(w Window, now time.Time) int64 {
	sec := now.Unix()
	switch w {
	case Hour:
		return floorDiv(sec, 3600) * 3600
	case Day:
		return floorDiv(sec, 86400) * 86400
	case Month:
		days := floorDiv(sec, 86400)
		return (days - dayOfMonth(days) + 1) * 86400
	default:
		s, _ := WindowBounds(w, now)
		return s.Unix()
	}
}

// calEnd returns the Unix second at which the calendar window w (Hour,
// Day or Month) that starts at the Unix second start ends.
func calEnd(w Window, start int64) int64 {
	switch w {
	case Hour:
		return start + 3600
	case Day:
		return start + 86400
	}
	// 31 days after a month's first day is in the next month.
	return calStart(Month, time.Unix(start+31*86400, 0))
}

// dayOfMonth returns the day of the month (1–31, proleptic Gregorian, as
// package time counts) of the day days after 1970-01-01 (H. Hinnant's
// civil_from_days).
func dayOfMonth(days int64) int64 {
	z := days + 719468                    // days since 0000-03-01
	doe := z - floorDiv(z, 146097)*146097 // day of the 400-year era, [0, 146096]
	yoe := (doe - doe/1460 + doe/36524 - doe/146096) / 365
	doy := doe - (365*yoe + yoe/4 - yoe/100) // day of the year from March 1, [0, 365]
	mp := (5*doy + 2) / 153                  // month from March, [0, 11]
	return doy - (153*mp+2)/5 + 1
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// Limit is one threshold pair over one [Window], for example "block at 10
// USD per day, warn at 8". Amounts are in whatever unit the caller counts
// (tokens, USD); one [Counter] key should count one unit.
//
// Admission with estimate a, settled usage u in the window and outstanding
// reservations r on the key (requests already in flight) is refused when
// Block > 0 and u+r >= Block, whatever a: a request is admitted while
// there is room left, even when its own estimate is larger than the room
// (so the first request under any budget goes through), and a spent budget
// admits nothing, not even a zero estimate. Warn is reported when Warn > 0
// and u+r+a >= Warn; warn never refuses.
type Limit struct {
	// Window is the period counted over. Required.
	Window Window `json:"window"`
	// Warn is the warning threshold. If zero, no warning.
	Warn float64 `json:"warn,omitempty"`
	// Block is the blocking threshold. If zero, no blocking.
	Block float64 `json:"block,omitempty"`
}

func (l Limit) validate() error {
	if !l.Window.valid() || l.Warn < 0 || l.Block < 0 || l.Warn != l.Warn || l.Block != l.Block {
		return fmt.Errorf("%w: %+v", ErrInvalidLimit, l)
	}
	return nil
}

// Decision is the answer to an admission check.
type Decision struct {
	// Allowed reports whether the request is admitted.
	Allowed bool
	// Warn reports whether a warn threshold is reached (for a [Counter]).
	// It never refuses by itself.
	Warn bool
	// Degraded reports that the backend could not be reached and the
	// decision comes from its fail policy, not from the counts.
	Degraded bool
	// Limit is the limit that refused the request (the one lifted last
	// when several refuse); when admitted with Warn, the first limit whose
	// warn threshold is reached; otherwise the blocking limit with the
	// least headroom left, or zero. For [Limiter.Allow] it is
	// {Window: Minute, Block: limit}, zero when unlimited.
	Limit Limit
	// Used is what counts against Limit after the decision, this request
	// included when admitted: requests in the last minute for Allow; settled
	// usage plus outstanding reservations for a Counter.
	Used float64
	// Reserved is the part of Used held by reservations of requests in
	// flight (this request's estimate included when admitted); Used minus
	// Reserved is the settled usage. Zero for [Limiter.Allow].
	Reserved float64
	// RetryAfter is, when refused, how long until the request could be
	// admitted: until the oldest request leaves the sliding window (Allow,
	// Minute limits), or until the calendar window ends (Hour, Day, Month).
	// It is zero for a Total limit, which never resets.
	RetryAfter time.Duration
}

// Reservation is an admitted estimate held against a [Counter] key until
// [Counter.Settle]. It is a small value: copies refer to the same
// reservation, and only the first Settle of any copy has an effect. The
// zero Reservation settles to nothing.
type Reservation struct {
	key    string
	amount float64
	id     uint64 // Local
	member string // Redis: the id of the request's reservations record
	part   int    // Redis: the charge's index in its request
	// recorded reports whether the backend holds the reservation (false
	// for a zero estimate or a fail-open admission).
	recorded bool
	// local reports a Redis admission on the replica's local share while
	// Redis was unreachable (member identifies its settlement).
	local bool
	done  *atomic.Bool
}

// Key returns the counter key the reservation was made on.
func (r Reservation) Key() string { return r.key }

// Amount returns the reserved estimate.
func (r Reservation) Amount() float64 { return r.amount }

// settleOnce reports whether this call is the first settle of r.
func (r Reservation) settleOnce() bool {
	return r.done != nil && r.done.CompareAndSwap(false, true)
}

// Limiter admits requests against a per-minute request rate.
// Implementations are safe for concurrent use.
type Limiter interface {
	// Allow admits one request for key (for example "team:<id>") if fewer
	// than limit requests were admitted for key in the sliding minute
	// ending at now. A limit <= 0 means unlimited. A refusal carries the
	// time until the oldest admission leaves the window.
	Allow(ctx context.Context, key string, limit int, now time.Time) (Decision, error)
}

// Counter keeps windowed usage (tokens, USD) per key and admits requests
// against reservations. Implementations are safe for concurrent use.
type Counter interface {
	// Reserve checks settled usage plus outstanding reservations plus
	// amount against every limit (see [Limit]) and, when admitted, reserves
	// amount on key until Settle or until the backend's reservation TTL.
	// The Reservation is meaningful only when the Decision is Allowed.
	Reserve(ctx context.Context, key string, amount float64, limits []Limit, now time.Time) (Reservation, Decision, error)
	// Settle releases r and charges actual to every window containing now.
	// Only the first Settle of a reservation (or any copy) counts;
	// Settle(r, 0) cancels.
	Settle(ctx context.Context, r Reservation, actual float64, now time.Time) error
	// Add charges amount to key's windows containing now without a
	// reservation (usage known after the fact, or seeding from stored
	// records at start-up).
	Add(ctx context.Context, key string, amount float64, now time.Time) error
	// Usage returns the settled usage of key in window w containing now
	// (reservations not included).
	Usage(ctx context.Context, key string, w Window, now time.Time) (float64, error)
}

// Backend is a [Limiter], a [Counter], an [Admitter] and a [Settler]
// with an off switch.
type Backend interface {
	Limiter
	Counter
	Admitter
	Settler
	// Close releases the backend's resources. It does not close a Redis
	// client the caller passed in.
	Close() error
}

// check evaluates limits for a request of amount, given a function that
// returns the settled usage in a window and the outstanding reservations.
// retry returns how long until limit l could admit amount.
func check(limits []Limit, amount, reserved float64, used func(Window) float64, retry func(l Limit, used float64) time.Duration) Decision {
	d := Decision{Allowed: true}
	var warnLimit, tight Limit
	var warnUsed, tightUsed float64
	refused, haveTight := false, false
	for _, l := range limits {
		if l.Block <= 0 && l.Warn <= 0 {
			continue
		}
		u := used(l.Window)
		tot := u + reserved
		if l.Warn > 0 && tot+amount >= l.Warn && !d.Warn {
			d.Warn = true
			warnLimit, warnUsed = l, tot+amount
		}
		if l.Block <= 0 {
			continue
		}
		if tot >= l.Block {
			ra := retry(l, u)
			// Report the limit that is lifted last; Total is never lifted.
			if !refused || d.Limit.Window != Total && (l.Window == Total || ra > d.RetryAfter) {
				d.Limit, d.Used, d.Reserved, d.RetryAfter = l, tot, reserved, ra
			}
			refused = true
		} else if !haveTight || l.Block-(tot+amount) < tight.Block-tightUsed {
			tight, tightUsed, haveTight = l, tot+amount, true
		}
	}
	switch {
	case refused:
		d.Allowed = false
		if d.Limit.Window == Total {
			d.RetryAfter = 0
		}
	case d.Warn:
		d.Limit, d.Used, d.Reserved = warnLimit, warnUsed, reserved+amount
	case haveTight:
		d.Limit, d.Used, d.Reserved = tight, tightUsed, reserved+amount
	}
	return d
}

// calRetry returns the time until the calendar window w containing now ends.
func calRetry(w Window, now time.Time) time.Duration {
	if w == Total {
		return 0
	}
	_, end := WindowBounds(w, now)
	return end.Sub(now)
}

func validate(amount float64, limits []Limit) error {
	if amount < 0 || amount != amount {
		return fmt.Errorf("%w: amount %v", ErrInvalidLimit, amount)
	}
	for _, l := range limits {
		if err := l.validate(); err != nil {
			return err
		}
	}
	return nil
}
