package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/limit"
	"github.com/keypool/keypool/meter"
	"github.com/keypool/keypool/proxy"
	"github.com/keypool/keypool/store"
)

// HeaderBudgetWarning is set on a proxied response when the request was
// admitted past a budget's warn threshold, e.g. "team day cost 81%"
// (scope, window, unit, and the share of the block threshold, or of the
// warn threshold when there is none, used with this request's estimate).
// Several warnings are separated by ", ".
const HeaderBudgetWarning = "X-Keypool-Budget-Warning"

// svcMeta is what the server keeps per service beside the pool: its
// client limits, its metering family and its price table. It is
// immutable once built.
type svcMeta struct {
	limits store.Limits
	family meter.Family
	detect bool // llm_family "": detect per request
	prices *meter.PriceTable
	budget *scopeBudget
	// disabled: the service is switched off (is_active false).
	disabled bool
	// description is the service's description, for GET /services.
	description string
}

// scopeLimits are one scope's budgets as limit.Limits, per unit.
type scopeLimits struct {
	tpm  []limit.Limit // Minute, reserved with a zero estimate
	tok  []limit.Limit // Hour, Day, Month, Total in tokens
	cost []limit.Limit // Hour, Day, Month, Total in USD
}

func (l *scopeLimits) empty() bool { return len(l.tpm) == 0 && len(l.tok) == 0 && len(l.cost) == 0 }

// budgetFields are the budget fields of [store.Limits], comparable.
type budgetFields struct {
	tpm, daily                   int64
	tokHW, tokHB, tokDW, tokDB   int64
	tokMW, tokMB, tokTB          int64
	costHW, costHB, costDW       float64
	costDB, costMW, costMB, cTot float64
}

func fieldsOf(l *store.Limits) budgetFields {
	return budgetFields{
		l.TPMLimit, l.DailyTokenLimit,
		l.LimitTokensHourWarn, l.LimitTokensHourBlock, l.LimitTokensDayWarn, l.LimitTokensDayBlock,
		l.LimitTokensMonthWarn, l.LimitTokensMonthBlock, l.LimitTokensTotalBlock,
		l.LimitCostHourWarn, l.LimitCostHourBlock, l.LimitCostDayWarn,
		l.LimitCostDayBlock, l.LimitCostMonthWarn, l.LimitCostMonthBlock, l.LimitCostTotalBlock,
	}
}

// budgetLimits turns the limit fields of a service, team or token into
// limit.Limits.
func budgetLimits(l *store.Limits) scopeLimits {
	var s scopeLimits
	if l.TPMLimit > 0 {
		s.tpm = []limit.Limit{{Window: limit.Minute, Block: float64(l.TPMLimit)}}
	}
	tok := func(w limit.Window, warn, block int64) {
		if warn > 0 || block > 0 {
			s.tok = append(s.tok, limit.Limit{Window: w, Warn: float64(warn), Block: float64(block)})
		}
	}
	tok(limit.Hour, l.LimitTokensHourWarn, l.LimitTokensHourBlock)
	tok(limit.Day, l.LimitTokensDayWarn, l.LimitTokensDayBlock)
	tok(limit.Day, 0, l.DailyTokenLimit)
	tok(limit.Month, l.LimitTokensMonthWarn, l.LimitTokensMonthBlock)
	tok(limit.Total, 0, l.LimitTokensTotalBlock)
	cost := func(w limit.Window, warn, block float64) {
		if warn > 0 || block > 0 {
			s.cost = append(s.cost, limit.Limit{Window: w, Warn: warn, Block: block})
		}
	}
	cost(limit.Hour, l.LimitCostHourWarn, l.LimitCostHourBlock)
	cost(limit.Day, l.LimitCostDayWarn, l.LimitCostDayBlock)
	cost(limit.Month, l.LimitCostMonthWarn, l.LimitCostMonthBlock)
	cost(limit.Total, 0, l.LimitCostTotalBlock)
	return s
}

// scopeBudget is one scope's budgets and counter keys, cached per team,
// token and service so that admission allocates nothing for them.
type scopeBudget struct {
	fields budgetFields
	limits scopeLimits
	keys   [3]string // per unit: "tpm:team:<id>", "tok:…", "usd:…"
}

func newScopeBudget(scope uint8, id string, l *store.Limits) *scopeBudget {
	b := &scopeBudget{fields: fieldsOf(l), limits: budgetLimits(l)}
	for u := range b.keys {
		b.keys[u] = unitPrefix[u] + scopeNames[scope] + ":" + id
	}
	return b
}

// budgetCache holds the scopeBudget of every team and token seen, keyed
// by id, rebuilt when its limits change. Its size is bounded by the
// teams and tokens in the store; it is cleared on admin changes.
type budgetCache struct{ m [2]sync.Map } // scopeToken, scopeTeam

func (c *budgetCache) get(scope uint8, id string, l *store.Limits) *scopeBudget {
	f := fieldsOf(l)
	if v, ok := c.m[scope].Load(id); ok {
		if b := v.(*scopeBudget); b.fields == f {
			return b
		}
	}
	b := newScopeBudget(scope, id, l)
	c.m[scope].Store(id, b)
	return b
}

func (c *budgetCache) clear() {
	for i := range c.m {
		c.m[i].Clear()
	}
}

// Budget units and their counter key prefixes.
const (
	unitTPM uint8 = iota
	unitTokens
	unitCost
)

var unitPrefix = [...]string{"tpm:", "tok:", "usd:"}

func unitName(u uint8) string {
	if u == unitCost {
		return "cost"
	}
	return "tokens"
}

// Scopes, in the order budgets are checked.
const (
	scopeToken uint8 = iota
	scopeTeam
	scopeService
	scopeRouter // the router a routed request came through
)

var scopeNames = [...]string{"token", "team", "service", "router"}

// hold is one reservation a request holds until it settles.
type hold struct {
	r    limit.Reservation
	unit uint8
}

// unheld is a counter a request charges without a reservation (a scope
// with no budget in that unit), so that its usage is known when a budget
// is set later.
type unheld struct {
	key  string
	unit uint8
}

// buildMeta reads the per-service metering settings of svcs.
func (s *Server) buildMeta(svcs []store.Service) map[string]*svcMeta {
	m := make(map[string]*svcMeta, len(svcs))
	for _, sv := range svcs {
		meta := &svcMeta{limits: sv.Limits, prices: s.basePrices, detect: sv.LLMFamily == "",
			disabled: sv.Disabled, description: sv.Description}
		if !meta.detect {
			f, err := meter.ParseFamily(sv.LLMFamily)
			if err != nil {
				s.log.Warn("service has an unknown llm_family; not metering it", "service", sv.Name, "llm_family", sv.LLMFamily)
			}
			meta.family = f
		}
		if sv.Prices != "" {
			p, err := meter.ParsePrices([]byte(sv.Prices))
			if err != nil {
				s.log.Warn("service prices unreadable; using the default table", "service", sv.Name, "err", err)
			} else {
				meta.prices = s.basePrices.Merge(p)
			}
		}
		meta.budget = newScopeBudget(scopeService, sv.Name, &meta.limits)
		m[sv.Name] = meta
	}
	return m
}

func (s *Server) meta(name string) *svcMeta {
	if m := s.svcMeta.Load(); m != nil {
		if v := (*m)[name]; v != nil {
			return v
		}
	}
	return &svcMeta{prices: s.basePrices, detect: true, budget: newScopeBudget(scopeService, name, &store.Limits{})}
}

// loadPrices returns the shipped price table merged with the price file.
// Keys of a model file the table has no use for are logged once.
func loadPrices(file string, log *slog.Logger) (*meter.PriceTable, error) {
	t := meter.DefaultPrices()
	if file == "" {
		return t, nil
	}
	p, ignored, err := meter.LoadPriceFile(file)
	if err != nil {
		return nil, fmt.Errorf("server: prices file: %w", err)
	}
	if len(ignored) > 0 {
		log.Warn("prices file: ignoring keys a price has no field for", "file", file, "count", len(ignored),
			"keys", strings.Join(ignored[:min(len(ignored), 10)], ", "))
	}
	return t.Merge(p), nil
}

// prepare is the proxy's Prepare hook: with the request body buffered, it
// enforces model allow-lists, and for metered requests (an LLM family)
// reads model and stream, asks OpenAI-compatible streams for their usage
// chunk, turns compression off, and admits the request against its
// token and cost budgets with a reservation.
func (s *Server) prepare(r *http.Request, svc *keypool.Service, body []byte) (*http.Request, []byte, error) {
	c := callFrom(r.Context())
	if c == nil {
		return nil, nil, nil
	}
	meta := s.meta(svc.Name)
	fam := meta.family
	routed := c.router != ""
	switch {
	case routed:
		// A router speaks the OpenAI API to every target (their
		// OpenAI-compatible endpoints), whatever their own family.
		fam = meter.FamilyOpenAI
	case meta.detect:
		fam = meter.DetectFamily(svc.BaseURL, r.URL.Path, "")
	}
	p := c.principal
	if routed {
		// A routed attempt: the router checked the caller's lists on the
		// model the client named; the target's own list applies to the
		// model sent upstream.
		p = nil
	}
	lists := len(meta.limits.ModelsEnabled) > 0 || p != nil && (len(p.Team.ModelsEnabled) > 0 || len(p.Token.ModelsEnabled) > 0)
	guess := fam == meter.FamilyNone && meta.detect && jsonObject(body)
	if fam == meter.FamilyNone && !lists && !guess {
		return nil, nil, nil
	}
	var info meter.RequestInfo
	if len(body) > 0 {
		info = meter.InspectRequest(body)
	}
	if guess && info.Model != "" {
		// Neither llm_family nor the URL says: a JSON request naming a
		// model is metered as OpenAI-compatible, and the answer decides
		// (its "choices"; see chargedUsage).
		fam, c.guessed = meter.FamilyOpenAI, true
	}
	model := info.Model
	stream := info.Stream
	// A model in the path (Gemini, Vertex AI) is the one the upstream
	// serves, whatever the body says: it is checked and priced.
	if m := meter.ModelFromPath(r.URL.Path); m != "" {
		model = m
	}
	if fam == meter.FamilyGemini && meter.IsStreamPath(r.URL.Path) {
		stream = true
	}
	if lists {
		named, err := checkModels(r, meta, p, fam, body, &info)
		if err != nil {
			return nil, nil, err
		}
		if model == "" {
			model = named
		}
	}
	if fam == meter.FamilyNone {
		return nil, nil, nil
	}
	c.family, c.model, c.prices = fam, model, meta.prices
	var newBody []byte
	if fam == meter.FamilyOpenAI && stream && !info.IncludeUsage && meter.AcceptsStreamOptions(r.URL.Path) &&
		(routed || !meta.detect || acceptsStreamOptions(svc.BaseURL)) {
		if b, added := meter.EnsureStreamUsage(body); added {
			newBody, c.strip = b, true
		}
	}
	meter.NegotiateIdentity(r.Header)

	out := info.MaxTokens
	if out <= 0 {
		out = s.cfg.DefaultOutputTokens
	}
	in := int64(len(body)+3) / 4
	estTok := float64(in + out)
	var estCost float64
	if pr, ok := meta.prices.Lookup(model); ok {
		estCost = meter.Cost(meter.Usage{Model: model, InputTokens: in, OutputTokens: out}, pr)
	}
	c.estIn, c.estOut, c.estCost = in, out, estCost
	if err := s.reserve(r.Context(), c, svc.Name, meta, estTok, estCost); err != nil {
		return nil, nil, err
	}
	return nil, newBody, nil
}

// errModelRequired is the refusal of a request that must name a model
// (see [meter.RequiresModel]) and names none, or names it ambiguously,
// while an allow-list applies.
func errModelRequired() error {
	return httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden,
		"models_enabled is set: the request must name an enabled model")
}

// checkModels enforces the model allow-lists that apply to a request
// (service, team, token). It fails closed: every model the request names
// — in the path (".../models/{m}"), in a query parameter or a JSON member
// or form field named "model", "model_id" or "modelId" (JSON names
// compared unescaped, every occurrence) — must be on every list; a
// model member that is not a plain string, JSON members naming different
// models, or a form or query that cannot be read are refused; and a
// request that names no model is refused when [meter.RequiresModel] says
// it must name one. It returns the first model named, for pricing.
func checkModels(r *http.Request, meta *svcMeta, p *auth.Principal, fam meter.Family, body []byte, info *meter.RequestInfo) (string, error) {
	var first string
	found := false
	var refused error
	check := func(m string) {
		if refused != nil {
			return
		}
		if !found {
			first, found = m, true
		}
		// Gemini bodies (cachedContents) name "models/gemini-…".
		if m2 := strings.TrimPrefix(m, "models/"); !modelAllowed(meta, p, m2) {
			refused = httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden, "model %q is not enabled for this service, team or token", m2)
		}
	}
	meter.EachPathModel(r.URL.Path, check)
	if raw := r.URL.RawQuery; raw != "" {
		q, err := url.ParseQuery(raw)
		if err != nil && strings.Contains(strings.ToLower(raw), "model") {
			return "", errModelRequired() // a query an upstream may read otherwise
		}
		for _, name := range meter.ModelParams {
			for _, v := range q[name] {
				check(v)
			}
		}
	}
	if info.ModelAmbiguous {
		return "", errModelRequired()
	}
	if info.Model != "" {
		check(info.Model)
	}
	if len(body) > 0 {
		if form, ok := meter.EachFormModel(r.Header.Get("Content-Type"), body, check); form && !ok && refused == nil {
			return "", httpx.Errorf(http.StatusForbidden, httpx.CodeForbidden,
				"models_enabled is set: the request's form could not be read to check its model")
		}
	}
	if refused != nil {
		return "", refused
	}
	if !found && meter.RequiresModel(r.URL.Path, len(body) > 0, fam != meter.FamilyNone) {
		return "", errModelRequired()
	}
	return strings.TrimPrefix(first, "models/"), nil
}

// modelAllowed reports whether every non-empty allow-list (service, team,
// token) holds model; p nil checks the service's alone.
func modelAllowed(meta *svcMeta, p *auth.Principal, model string) bool {
	if l := meta.limits.ModelsEnabled; len(l) > 0 && !slices.Contains(l, model) {
		return false
	}
	return p == nil || p.AllowsModel(model)
}

// admission is the scratch space of one request's admission: its charges
// (one per scope and unit with a budget), their decisions and
// reservations, pooled so that admitting allocates nothing.
type admission struct {
	charges [maxHolds]limit.Charge
	scope   [maxHolds]uint8
	unit    [maxHolds]uint8
	res     [maxHolds]limit.Reservation
	ds      [maxHolds]limit.Decision
}

// maxHolds is the most reservations a request holds: one per scope
// (token, team, service, router) and unit (tpm, tokens, cost).
const maxHolds = 12

var admissions = sync.Pool{New: func() any { return new(admission) }}

// reserve admits a metered request against the budgets of its token, its
// team and its service, in one atomic admission on every counter at once
// ([limit.Admitter]: one Lua script on Redis): each is admitted while its
// settled usage plus the reservations in flight is below its block
// threshold, and the request then holds its estimate on each, recorded on
// c. A refusal holds nothing and is 429 budget_exceeded with Retry-After
// at the end of the refusing window.
func (s *Server) reserve(ctx context.Context, c *call, service string, meta *svcMeta, estTok, estCost float64) error {
	p := c.principal
	if p.Admin {
		return nil
	}
	now := s.now()
	var scopes [4]*scopeBudget
	if p.Token.ID != "" {
		scopes[scopeToken] = s.budgets.get(scopeToken, p.Token.ID, &p.Token.Limits)
	}
	if p.Team.ID != "" {
		scopes[scopeTeam] = s.budgets.get(scopeTeam, p.Team.ID, &p.Team.Limits)
	}
	scopes[scopeService] = meta.budget
	if c.router != "" {
		scopes[scopeRouter] = s.meta(c.router).budget
	}
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
		for u, lims := range [...][]limit.Limit{sc.limits.tpm, sc.limits.tok, sc.limits.cost} {
			unit := uint8(u)
			key := sc.keys[unit]
			if len(lims) == 0 {
				if unit != unitTPM && c.nUnheld < len(c.unheld) {
					c.unheld[c.nUnheld] = unheld{key, unit}
					c.nUnheld++
				}
				continue
			}
			amount := estTok
			switch unit {
			case unitTPM:
				amount = 0 // tpm_limit: admitted while the minute's usage is under it
			case unitCost:
				amount = estCost
			}
			a.charges[n] = limit.Charge{Key: key, Amount: amount, Limits: lims}
			a.scope[n], a.unit[n] = uint8(si), unit
			n++
		}
	}
	if n == 0 {
		return nil
	}
	which, err := s.limiter.ReserveAll(ctx, a.charges[:n], a.res[:n], a.ds[:n], now)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.log.Warn("budget check failed; admitting", "err", err)
		return nil
	}
	if which >= 0 && a.ds[which].Degraded {
		s.metrics.budgetRejections.WithLabelValues(scopeNames[a.scope[which]], "unavailable", unitName(a.unit[which])).Inc()
		return errLimitsUnavailable("budgets")
	}
	if which >= 0 {
		scope, unit := scopeNames[a.scope[which]], a.unit[which]
		s.metrics.budgetRejections.WithLabelValues(scope, a.ds[which].Limit.Window.String(), unitName(unit)).Inc()
		return budgetError(scope, unit, a.ds[which])
	}
	var warn []string
	for i := range n {
		c.holds[i] = hold{a.res[i], a.unit[i]}
		if d := a.ds[i]; d.Warn {
			scope, unit := scopeNames[a.scope[i]], a.unit[i]
			warn = append(warn, warningText(scope, unit, d))
			s.metrics.budgetWarnings.WithLabelValues(scope, d.Limit.Window.String(), unitName(unit)).Inc()
			s.log.Warn("budget warning", "scope", scope, "counter", a.charges[i].Key, "window", d.Limit.Window.String(),
				"unit", unitName(unit), "used", d.Used, "warn", d.Limit.Warn, "block", d.Limit.Block)
		}
	}
	c.nHolds = n
	if len(warn) > 0 {
		c.warning = strings.Join(warn, ", ")
	}
	return nil
}

// settle charges a finished request's metered tokens and cost to every
// counter it was admitted on (0 when nothing was metered: an upstream
// error, a client that went away before usage arrived).
func (s *Server) settle(c *call, tokens, cost float64, now time.Time) {
	ctx := context.Background()
	for i := range c.nHolds {
		h := c.holds[i]
		actual := tokens
		if h.unit == unitCost {
			actual = cost
		}
		s.budgetCharged("settle", s.limiter.Settle(ctx, h.r, actual, now))
	}
	for i := range c.nUnheld {
		h := c.unheld[i]
		actual := tokens
		if h.unit == unitCost {
			actual = cost
		}
		if actual > 0 {
			s.budgetCharged("charge", s.limiter.Add(ctx, h.key, actual, now))
		}
	}
	c.nHolds, c.nUnheld = 0, 0
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

func amount(unit uint8, v float64) string {
	if unit == unitCost {
		return "$" + strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(math.Round(v), 'f', 0, 64) + " tokens"
}

// totalRetryAfter is the Retry-After of a refusal by a total limit,
// which never resets: a day, so that a client polls rarely.
const totalRetryAfter = 24 * time.Hour

// budgetError is the 429 budget_exceeded answer for a refusal.
func budgetError(scope string, unit uint8, d limit.Decision) error {
	name := unitName(unit)
	if unit == unitTPM {
		name = "tokens-per-minute"
	}
	settled := max(d.Used-d.Reserved, 0)
	msg := fmt.Sprintf("budget exceeded: %s %s %s limit is %s: %s used, %s reserved by requests in flight", scope, windowWord(d.Limit.Window), name,
		amount(unit, d.Limit.Block), amount(unit, settled), amount(unit, d.Reserved))
	ra := d.RetryAfter
	if d.Limit.Window == limit.Total {
		// A total limit never resets: Retry-After is only how long a
		// client should wait before asking again.
		msg += "; a total limit never resets: this stays refused until an admin raises or removes it (retry after 86400 s)"
		ra = totalRetryAfter
	} else {
		ra = max(ra, time.Second)
		msg += fmt.Sprintf("; retry after %d s", int64((ra+time.Second-1)/time.Second))
	}
	return &httpx.Error{Status: http.StatusTooManyRequests, Code: httpx.CodeBudgetExceeded, RetryAfter: ra, Message: msg}
}

// warningText is one HeaderBudgetWarning entry: "team day cost 81%".
func warningText(scope string, unit uint8, d limit.Decision) string {
	of := d.Limit.Block
	if of <= 0 {
		of = d.Limit.Warn
	}
	pct := 0.0
	if of > 0 {
		pct = math.Floor(d.Used * 100 / of)
	}
	return fmt.Sprintf("%s %s %s %.0f%%", scope, d.Limit.Window, unitName(unit), pct)
}

// chargeKey deducts a finished request's metered spend from the serving
// key's balance, in the key's balance unit: USD for "usd", tokens for
// "tokens", one per successful request for "requests", and returns it.
// The pool learns it at once (a spent key turns exhausted); the store
// gets it with the request's usage record (its KeySpend), in the same
// transaction as the record and only once per record, so balance_used
// follows the records, also after a crash and a journal replay.
func (s *Server) chargeKey(service, keyID, unit string, status int, tokens, cost float64) float64 {
	var amt float64
	switch strings.ToLower(unit) {
	case "usd", "$", "dollars":
		amt = cost
	case "tokens", "token":
		amt = tokens
	case "requests", "request", "calls":
		if status >= 200 && status < 300 {
			amt = 1
		}
	}
	if amt <= 0 {
		return 0
	}
	s.pool.Spend(service, keyID, amt)
	return amt
}

// seedCounters charges the local budget counters with the stored usage
// of the current hour, day and month (UTC) and of all stored time, so a
// restart does not reset a budget. Only the local backend needs it:
// Redis keeps its counts across restarts. Usage older than the usage
// retention (30 days by default) is gone from the store, so a total
// limit counts from then.
func (s *Server) seedCounters(ctx context.Context) error {
	now := s.now()
	hourStart, _ := limit.WindowBounds(limit.Hour, now)
	dayStart, _ := limit.WindowBounds(limit.Day, now)
	monthStart, _ := limit.WindowBounds(limit.Month, now)
	type sums struct{ tok, cost [4]float64 } // total, month, day, hour
	since := [4]time.Time{{}, monthStart, dayStart, hourStart}
	// A router's budget counters are its service counters.
	groups := [...]struct{ dim, scope string }{
		{store.GroupToken, "token"}, {store.GroupTeam, "team"}, {store.GroupService, "service"}, {store.GroupRouter, "service"},
	}
	n := 0
	for _, grp := range groups {
		g := grp.dim
		per := map[string]*sums{}
		for wi, from := range since {
			rows, err := s.st.QueryUsage(ctx, store.UsageQuery{Since: from, Until: now.Add(time.Second), GroupBy: []string{g}})
			if err != nil {
				return fmt.Errorf("server: seed budgets from usage: %w", err)
			}
			for _, row := range rows {
				id := row.Group[g]
				if id == "" {
					continue
				}
				sm := per[id]
				if sm == nil {
					sm = &sums{}
					per[id] = sm
				}
				sm.tok[wi] = float64(row.TokensIn + row.TokensOut)
				sm.cost[wi] = row.Cost
			}
		}
		// Charge oldest first, each part at a time inside its own
		// window: before this month, this month before today, today
		// before this hour, this hour.
		at := [4]time.Time{monthStart.Add(-time.Second), dayStart.Add(-time.Second), hourStart.Add(-time.Second), hourStart}
		for id, sm := range per {
			base := grp.scope + ":" + id
			for i := range 4 {
				tok, cost := sm.tok[i], sm.cost[i]
				if i < 3 {
					tok -= sm.tok[i+1]
					cost -= sm.cost[i+1]
				}
				if tok > 0.5 {
					_ = s.limiter.Add(ctx, unitPrefix[unitTokens]+base, tok, at[i])
				}
				if cost > 1e-9 {
					_ = s.limiter.Add(ctx, unitPrefix[unitCost]+base, cost, at[i])
				}
			}
			n++
		}
	}
	if n > 0 {
		s.log.Info("budgets seeded from stored usage", "counters", n)
	}
	return nil
}

// modelsPath reports whether path is a model listing, GET
// /v1/{service}/models or /v1/{service}/v1/models, and names the service.
func modelsPath(path string) (string, bool) {
	rest, ok := strings.CutPrefix(path, "/v1/")
	if !ok {
		return "", false
	}
	svc, tail, ok := strings.Cut(rest, "/")
	if !ok || svc == "" || (tail != "models" && tail != "v1/models") {
		return "", false
	}
	return svc, true
}

// serveV1 answers model listings of services with an allow-list itself,
// and hands everything else to the proxy.
func (s *Server) serveV1(w http.ResponseWriter, r *http.Request) {
	if name, t, ok := s.routerFor(r.URL.Path); ok {
		if _, models := modelsPath(r.URL.Path); models && r.Method == http.MethodGet {
			s.serveRouterModels(w, r, name, t)
			return
		}
		s.routes.ServeHTTP(w, r)
		return
	}
	if r.Method == http.MethodGet {
		if name, ok := modelsPath(r.URL.Path); ok {
			if meta := s.meta(name); len(meta.limits.ModelsEnabled) > 0 {
				s.serveModels(w, r, name, meta)
				return
			}
		}
	}
	s.proxy.ServeHTTP(w, r)
}

type modelEntry struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

// serveModels answers the OpenAI-style list of the models enabled for
// the caller: the service's allow-list, narrowed by the team's and the
// token's.
func (s *Server) serveModels(w http.ResponseWriter, r *http.Request, service string, meta *svcMeta) {
	ri := infoFrom(r.Context())
	if ri != nil {
		ri.service = service
	}
	fail := func(err error) {
		if e, ok := err.(*httpx.Error); ok && ri != nil {
			ri.code = e.Code
		}
		writeError(w, err)
	}
	cred, err := proxy.Credential(r)
	if err != nil {
		fail(err)
		return
	}
	p, err := s.authenticate(r, cred, false)
	if err != nil {
		fail(err)
		return
	}
	if ri != nil {
		ri.teamID, ri.tokenID = p.Team.ID, p.Token.ID
	}
	if err := s.admit(r.Context(), p, service); err != nil {
		fail(err)
		return
	}
	if _, ok := s.pool.Service(service); !ok {
		fail(httpx.Errorf(http.StatusNotFound, httpx.CodeUnknownService, "unknown service %q", service))
		return
	}
	var models []string
	for _, m := range meta.limits.ModelsEnabled {
		if p.AllowsModel(m) {
			models = append(models, m)
		}
	}
	writeModels(w, models, service)
}

// writeModels answers an OpenAI-style model list.
func writeModels(w http.ResponseWriter, models []string, owner string) {
	data := make([]modelEntry, 0, len(models))
	for _, m := range models {
		data = append(data, modelEntry{ID: m, Object: "model", OwnedBy: owner})
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(struct {
		Object string       `json:"object"`
		Data   []modelEntry `json:"data"`
	}{"list", data})
}

// chargedUsage returns the usage and cost to charge for a finished
// request: its metered usage, raised to at least the admission estimate
// (input and output tokens, and cost) when the request reached an
// upstream key but did not end cleanly with its usage — a metered 2xx
// answer read short of its end or without usage (a stream the client
// hung up on before the usage chunk), or a client that went away (499)
// after the request was sent. The upstream bills such requests; without
// the floor, hanging up before the usage chunk would spend budgets for
// free. Requests with neither a model nor a body (listings) have no
// floor. Found is true on the result when anything is charged.
func chargedUsage(c *call, res proxy.Result) (meter.Usage, float64) {
	var u meter.Usage
	var cost float64
	if c.metered && c.usage.Found {
		u = c.usage
		if c.prices != nil {
			cost, _ = c.prices.Cost(u)
		}
	}
	if c.family == meter.FamilyNone || res.KeyID == "" || (c.model == "" && c.estIn == 0) {
		return u, cost // not an LLM call: no model and no body (GET /v1/models)
	}
	if c.guessed && !c.usage.Found && !c.usage.Shaped {
		return meter.Usage{}, 0 // the answer is not OpenAI-shaped: not an LLM call keypoold can meter
	}
	if c.metered && !c.usage.Found && c.usage.Complete && c.family == meter.FamilyOpenAI && res.Status != 499 {
		// An OpenAI-shaped answer read to its end without usage (a
		// server that ignores stream_options.include_usage): charge what
		// was observed — the input estimated from the request, the
		// output from the streamed text — not the full reservation.
		u = meter.Usage{Model: c.usage.Model, InputTokens: c.estIn, OutputTokens: meter.EstimateTokens(c.usage.TextBytes),
			TextBytes: c.usage.TextBytes, Complete: true}
		if u.Model == "" {
			u.Model = c.model
		}
		u.Found = u.InputTokens > 0 || u.OutputTokens > 0
		if c.prices != nil {
			cost, _ = c.prices.Cost(u)
		}
		return u, cost
	}
	cut := (c.metered && (!c.usage.Found || !c.usage.Complete)) || res.Status == 499
	if !cut {
		return u, cost
	}
	if u.Model == "" {
		u.Model = c.model
	}
	u.InputTokens = max(u.InputTokens, c.estIn)
	u.OutputTokens = max(u.OutputTokens, c.estOut)
	u.Found = u.InputTokens > 0 || u.OutputTokens > 0
	if c.prices != nil {
		if fc, ok := c.prices.Cost(u); ok {
			cost = max(cost, fc)
		}
	}
	return u, max(cost, c.estCost)
}

// jsonObject reports whether body starts like a JSON object.
func jsonObject(body []byte) bool {
	b := bytes.TrimLeft(body, " \t\r\n")
	return len(b) > 0 && b[0] == '{'
}

// streamOptionsHosts are OpenAI-compatible APIs known to accept
// stream_options.include_usage. With llm_family "openai" set explicitly,
// keypoold adds it for any upstream; with the family detected, only for
// these, because some OpenAI-compatible servers reject unknown fields
// (a stream whose usage is not reported is charged its estimate).
var streamOptionsHosts = []string{"api.openai.com", "openai.azure.com", "api.groq.com", "api.together.xyz", "api.together.ai",
	"api.deepseek.com", "openrouter.ai", "api.fireworks.ai", "api.x.ai", "api.cerebras.ai"}

func acceptsStreamOptions(baseURL string) bool {
	u, err := url.Parse(baseURL)
	if err != nil {
		return false
	}
	host := strings.ToLower(u.Hostname())
	for _, h := range streamOptionsHosts {
		if host == h || strings.HasSuffix(host, "."+h) {
			return true
		}
	}
	return false
}
