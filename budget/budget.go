// Package budget admits metered requests against the token and cost
// budgets of their client token, team and service (tpm_limit,
// daily_token_limit, limit_tokens_*, limit_cost_*), over the counters of
// package limit.
//
// A request reserves an estimate on every budget of its scopes in one
// atomic admission ([Budgets.Reserve], [limit.Admitter]): each budget
// admits while its settled usage plus the reservations in flight is below
// its block threshold. When the request ends, [Budgets.Settle] charges its
// metered usage in place of the estimate. Windows are calendar-aligned in
// UTC (hour, day, month) or total; tpm_limit is a sliding minute. After a
// restart, [Budgets.Seed] charges the counters with the stored usage of
// the current windows.
//
// A [Budgets] is safe for concurrent use; a [Holds] belongs to one
// request.
package budget

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/keypool/keypool/limit"
	"github.com/keypool/keypool/store"
)

// Kind is the kind of a budget's scope.
type Kind uint8

// Scopes, in the order budgets are checked.
const (
	Token Kind = iota
	Team
	Service
	// Router is the router a routed request came through: a service
	// whose budgets (and counters) are its own service budgets.
	Router
	// NumKinds is the number of scope kinds: the length of the scopes
	// array [Budgets.Reserve] takes.
	NumKinds
)

var kindNames = [...]string{"token", "team", "service", "router"}

// String returns "token", "team", "service" or "router".
func (k Kind) String() string { return kindNames[k] }

// Unit is what a budget counts.
type Unit uint8

// Budget units.
const (
	TPM    Unit = iota // tokens per sliding minute (tpm_limit)
	Tokens             // tokens per window
	Cost               // USD per window
)

var unitPrefix = [...]string{"tpm:", "tok:", "usd:"}

// String returns "cost" for Cost and "tokens" for the others, as metric
// labels and warnings name them.
func (u Unit) String() string {
	if u == Cost {
		return "cost"
	}
	return "tokens"
}

// ErrUnavailable means the counters could not be checked and budgets fail
// closed (limit's fail policy on Redis): the request is refused.
var ErrUnavailable = errors.New("budget: counters unavailable")

// Scope is one scope's budgets and counter keys. It is immutable, so
// admission allocates nothing for it.
type Scope struct {
	fields fields
	limits [3][]limit.Limit // per Unit
	keys   [3]string        // per Unit: "tpm:team:<id>", "tok:…", "usd:…"
}

// NewScope returns the budgets l sets on the scope kind/id.
func NewScope(kind Kind, id string, l *store.Limits) *Scope {
	s := &Scope{fields: fieldsOf(l), limits: limitsOf(l)}
	for u := range s.keys {
		s.keys[u] = unitPrefix[u] + kind.String() + ":" + id
	}
	return s
}

// fields are the budget fields of [store.Limits], comparable.
type fields struct {
	tpm, daily                   int64
	tokHW, tokHB, tokDW, tokDB   int64
	tokMW, tokMB, tokTB          int64
	costHW, costHB, costDW       float64
	costDB, costMW, costMB, cTot float64
}

func fieldsOf(l *store.Limits) fields {
	return fields{
		l.TPMLimit, l.DailyTokenLimit,
		l.LimitTokensHourWarn, l.LimitTokensHourBlock, l.LimitTokensDayWarn, l.LimitTokensDayBlock,
		l.LimitTokensMonthWarn, l.LimitTokensMonthBlock, l.LimitTokensTotalBlock,
		l.LimitCostHourWarn, l.LimitCostHourBlock, l.LimitCostDayWarn,
		l.LimitCostDayBlock, l.LimitCostMonthWarn, l.LimitCostMonthBlock, l.LimitCostTotalBlock,
	}
}

// limitsOf turns the limit fields of a service, team or token into
// limit.Limits, per unit.
func limitsOf(l *store.Limits) [3][]limit.Limit {
	var s [3][]limit.Limit
	if l.TPMLimit > 0 {
		s[TPM] = []limit.Limit{{Window: limit.Minute, Block: float64(l.TPMLimit)}}
	}
	tok := func(w limit.Window, warn, block int64) {
		if warn > 0 || block > 0 {
			s[Tokens] = append(s[Tokens], limit.Limit{Window: w, Warn: float64(warn), Block: float64(block)})
		}
	}
	tok(limit.Hour, l.LimitTokensHourWarn, l.LimitTokensHourBlock)
	tok(limit.Day, l.LimitTokensDayWarn, l.LimitTokensDayBlock)
	tok(limit.Day, 0, l.DailyTokenLimit)
	tok(limit.Month, l.LimitTokensMonthWarn, l.LimitTokensMonthBlock)
	tok(limit.Total, 0, l.LimitTokensTotalBlock)
	cost := func(w limit.Window, warn, block float64) {
		if warn > 0 || block > 0 {
			s[Cost] = append(s[Cost], limit.Limit{Window: w, Warn: warn, Block: block})
		}
	}
	cost(limit.Hour, l.LimitCostHourWarn, l.LimitCostHourBlock)
	cost(limit.Day, l.LimitCostDayWarn, l.LimitCostDayBlock)
	cost(limit.Month, l.LimitCostMonthWarn, l.LimitCostMonthBlock)
	cost(limit.Total, 0, l.LimitCostTotalBlock)
	return s
}

// Counters is what [Budgets] needs of a limit backend (limit.Local and
// limit.Redis are both): one admission and one settlement per request.
type Counters interface {
	limit.Admitter
	limit.Settler
}

// Config configures [New].
type Config struct {
	// Logger receives budget warnings and failed settlements (counter
	// names, never a secret). If nil, slog.Default().
	Logger *slog.Logger
	// OnRefused and OnWarned, if set, are told of each refusal and each
	// warning, by scope, window ("unavailable" for a refusal because the
	// counters are down) and unit: the server counts them in metrics.
	OnRefused func(scope Kind, window string, unit Unit)
	OnWarned  func(scope Kind, window string, unit Unit)
	// OnCharged, if set, is told the outcome of every request's
	// settlement (op "settle": its reservations and its charges without
	// one, in one call to the counters), and failures are not logged
	// here: the server logs an outage once. If nil, each failure is
	// logged.
	OnCharged func(op string, err error)
}

// Budgets admits and settles requests on counters. Create it with [New].
type Budgets struct {
	c   Counters
	cfg Config
	log *slog.Logger
	// scopes caches the Scope of every token and team seen, by id,
	// rebuilt when its limits change; bounded by the tokens and teams in
	// the store and cleared by [Budgets.Clear].
	scopes [2]sync.Map // Token, Team
}

// New returns Budgets on the counters c.
func New(c Counters, cfg Config) *Budgets {
	b := &Budgets{c: c, cfg: cfg, log: cfg.Logger}
	if b.log == nil {
		b.log = slog.Default()
	}
	return b
}

// Scope returns the cached Scope of a token or team with limits l,
// rebuilding it when l changed.
func (b *Budgets) Scope(kind Kind, id string, l *store.Limits) *Scope {
	f := fieldsOf(l)
	if v, ok := b.scopes[kind].Load(id); ok {
		if s := v.(*Scope); s.fields == f {
			return s
		}
	}
	s := NewScope(kind, id, l)
	b.scopes[kind].Store(id, s)
	return s
}

// Clear forgets the cached scopes (after an admin change).
func (b *Budgets) Clear() {
	for i := range b.scopes {
		b.scopes[i].Clear()
	}
}

// Holds is what one request holds from admission to settlement: its
// reservations, the counters it charges without one, and its warnings.
// The zero value holds nothing; it allocates nothing.
type Holds struct {
	holds   [maxCharges]hold
	nHolds  int
	unheld  [2 * NumKinds]unheld
	nUnheld int
	// Warning is the request's warnings, e.g. "team day cost 81%", ", "
	// separated; empty when none.
	Warning string
}

// hold is one reservation a request holds until it settles.
type hold struct {
	r    limit.Reservation
	unit Unit
}

// unheld is a counter a request charges without a reservation (a scope
// with no budget in that unit), so that its usage is known when a budget
// is set later.
type unheld struct {
	key  string
	unit Unit
}

// admission is the scratch space of one admission, pooled so that
// admitting allocates nothing.
type admission struct {
	charges [maxCharges]limit.Charge
	kind    [maxCharges]Kind
	unit    [maxCharges]Unit
	res     [maxCharges]limit.Reservation
	ds      [maxCharges]limit.Decision
}

// maxCharges is the most counters a request charges with a reservation:
// one per scope kind and unit.
const maxCharges = int(NumKinds) * 3

var admissions = sync.Pool{New: func() any { return new(admission) }}

// Reserve admits a request against the budgets of its scopes (indexed by
// Kind; nil entries have none) in one atomic admission on every counter,
// holding estTok tokens and estCost USD on each budget (tpm_limit holds
// nothing: it admits while the minute's usage is under it), recorded in
// h. A refusal holds nothing and is a *[Refusal]; [ErrUnavailable] when
// the counters are down and fail closed. A counter error otherwise
// admits (logged), as does a request with no budget.
func (b *Budgets) Reserve(ctx context.Context, h *Holds, scopes [NumKinds]*Scope, estTok, estCost float64, now time.Time) error {
	a := admissions.Get().(*admission)
	n := 0
	defer func() {
		clear(a.charges[:n])
		clear(a.res[:n])
		clear(a.ds[:n])
		admissions.Put(a)
	}()
	for si, sc := range scopes {
		if sc == nil {
			continue
		}
		for u, lims := range sc.limits {
			unit := Unit(u)
			key := sc.keys[unit]
			if len(lims) == 0 {
				if unit != TPM && h.nUnheld < len(h.unheld) {
					h.unheld[h.nUnheld] = unheld{key, unit}
					h.nUnheld++
				}
				continue
			}
			amount := estTok
			switch unit {
			case TPM:
				amount = 0
			case Cost:
				amount = estCost
			}
			a.charges[n] = limit.Charge{Key: key, Amount: amount, Limits: lims}
			a.kind[n], a.unit[n] = Kind(si), unit
			n++
		}
	}
	if n == 0 {
		return nil
	}
	which, err := b.c.ReserveAll(ctx, a.charges[:n], a.res[:n], a.ds[:n], now)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		b.log.Warn("budget check failed; admitting", "err", err)
		return nil
	}
	if which >= 0 && a.ds[which].Degraded {
		b.refused(a.kind[which], "unavailable", a.unit[which])
		return ErrUnavailable
	}
	if which >= 0 {
		b.refused(a.kind[which], a.ds[which].Limit.Window.String(), a.unit[which])
		return &Refusal{Scope: a.kind[which], Unit: a.unit[which], Decision: a.ds[which]}
	}
	var warn []string
	for i := range n {
		h.holds[i] = hold{a.res[i], a.unit[i]}
		if d := a.ds[i]; d.Warn {
			kind, unit := a.kind[i], a.unit[i]
			warn = append(warn, warningText(kind, unit, d))
			if b.cfg.OnWarned != nil {
				b.cfg.OnWarned(kind, d.Limit.Window.String(), unit)
			}
			b.log.Warn("budget warning", "scope", kind.String(), "counter", a.charges[i].Key, "window", d.Limit.Window.String(),
				"unit", unit.String(), "used", d.Used, "warn", d.Limit.Warn, "block", d.Limit.Block)
		}
	}
	h.nHolds = n
	if len(warn) > 0 {
		h.Warning = strings.Join(warn, ", ")
	}
	return nil
}

func (b *Budgets) refused(kind Kind, window string, unit Unit) {
	if b.cfg.OnRefused != nil {
		b.cfg.OnRefused(kind, window, unit)
	}
}

// settlements is the scratch space of one settlement, pooled so that
// settling allocates nothing.
type settlements [len(Holds{}.holds) + len(Holds{}.unheld)]limit.Settlement

var settling = sync.Pool{New: func() any { return new(settlements) }}

// Settle charges a finished request's metered tokens and cost to every
// counter it holds (0 when nothing was metered: an upstream error, a
// client that went away before usage arrived), in one call to the
// counters (one round trip on Redis), and empties h.
func (b *Budgets) Settle(h *Holds, tokens, cost float64, now time.Time) {
	actual := func(u Unit) float64 {
		if u == Cost {
			return cost
		}
		return tokens
	}
	ss := settling.Get().(*settlements)
	n := 0
	for i := range h.nHolds {
		hd := h.holds[i]
		ss[n] = limit.Settlement{Res: hd.r, Actual: actual(hd.unit)}
		n++
	}
	for i := range h.nUnheld {
		u := h.unheld[i]
		if a := actual(u.unit); a > 0 {
			ss[n] = limit.Settlement{Key: u.key, Actual: a}
			n++
		}
	}
	if n > 0 {
		b.charged("settle", b.c.SettleAll(context.Background(), ss[:n], now))
	}
	clear(ss[:n])
	settling.Put(ss)
	h.nHolds, h.nUnheld = 0, 0
}

// charged reports the outcome of a settlement or charge.
func (b *Budgets) charged(op string, err error) {
	switch {
	case b.cfg.OnCharged != nil:
		b.cfg.OnCharged(op, err)
	case err != nil:
		b.log.Warn("budget "+op+" failed", "err", err)
	}
}
