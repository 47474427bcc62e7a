package budget

import (
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/keypool/keypool/limit"
)

// TotalRetryAfter is the Retry-After of a refusal by a total limit, which
// never resets: a day, so that a client polls rarely.
const TotalRetryAfter = 24 * time.Hour

// Refusal is a request refused by a budget: the scope and unit of the
// budget, and the counter's decision.
type Refusal struct {
	Scope    Kind
	Unit     Unit
	Decision limit.Decision
}

// Error says which budget refused, its limit, what is used and reserved,
// and when to retry, e.g. "budget exceeded: team daily cost limit is
// $5.00: $5.10 used, $0.00 reserved by requests in flight; retry after
// 3600 s".
func (r *Refusal) Error() string {
	d, unit := r.Decision, r.Unit
	name := unit.String()
	if unit == TPM {
		name = "tokens-per-minute"
	}
	settled := max(d.Used-d.Reserved, 0)
	msg := fmt.Sprintf("budget exceeded: %s %s %s limit is %s: %s used, %s reserved by requests in flight", r.Scope, windowWord(d.Limit.Window), name,
		amount(unit, d.Limit.Block), amount(unit, settled), amount(unit, d.Reserved))
	if d.Limit.Window == limit.Total {
		return msg + "; a total limit never resets: this stays refused until an admin raises or removes it (retry after 86400 s)"
	}
	return msg + fmt.Sprintf("; retry after %d s", int64((r.RetryAfter()+time.Second-1)/time.Second))
}

// RetryAfter is when the refusing window ends (at least a second), or
// [TotalRetryAfter] for a total limit.
func (r *Refusal) RetryAfter() time.Duration {
	if r.Decision.Limit.Window == limit.Total {
		// A total limit never resets: Retry-After is only how long a
		// client should wait before asking again.
		return TotalRetryAfter
	}
	return max(r.Decision.RetryAfter, time.Second)
}

func windowWord(w limit.Window) string {
	switch w {
	case limit.Minute:
		return "per-minute"
	case limit.Hour:
		return "hourly"
	case limit.Day:
		return "daily"
	case limit.Month:
		return "monthly"
	}
	return "total"
}

func amount(unit Unit, v float64) string {
	if unit == Cost {
		return "$" + strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(math.Round(v), 'f', 0, 64) + " tokens"
}

// warningText is one warning: "team day cost 81%" (scope, window, unit,
// and the share of the block threshold, or of the warn threshold when
// there is none, used with this request's estimate).
func warningText(kind Kind, unit Unit, d limit.Decision) string {
	of := d.Limit.Block
	if of <= 0 {
		of = d.Limit.Warn
	}
	pct := 0.0
	if of > 0 {
		pct = math.Floor(d.Used * 100 / of)
	}
	return fmt.Sprintf("%s %s %s %.0f%%", kind, d.Limit.Window, unit, pct)
}
