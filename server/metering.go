package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/budget"
	"github.com/keypool/keypool/internal/httpx"
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
	budget *budget.Scope
	// disabled: the service is switched off (is_active false).
	disabled bool
	// description is the service's description, for GET /services.
	description string
}

// buildMeta reads the per-service metering settings of svcs.
func (c *catalog) buildMeta(svcs []store.Service) map[string]*svcMeta {
	m := make(map[string]*svcMeta, len(svcs))
	for _, sv := range svcs {
		meta := &svcMeta{limits: sv.Limits, prices: c.basePrices, detect: sv.LLMFamily == "",
			disabled: sv.Disabled, description: sv.Description}
		if !meta.detect {
			f, err := meter.ParseFamily(sv.LLMFamily)
			if err != nil {
				c.log.Warn("service has an unknown llm_family; not metering it", "service", sv.Name, "llm_family", sv.LLMFamily)
			}
			meta.family = f
		}
		if sv.Prices != "" {
			p, err := meter.ParsePrices([]byte(sv.Prices))
			if err != nil {
				c.log.Warn("service prices unreadable; using the default table", "service", sv.Name, "err", err)
			} else {
				meta.prices = c.basePrices.Merge(p)
			}
		}
		meta.budget = budget.NewScope(budget.Service, sv.Name, &meta.limits)
		m[sv.Name] = meta
	}
	return m
}

// meta returns the settings of the service name (defaults for a service
// it does not know).
func (c *catalog) meta(name string) *svcMeta {
	if m := c.svcMeta.Load(); m != nil {
		if v := (*m)[name]; v != nil {
			return v
		}
	}
	return &svcMeta{prices: c.basePrices, detect: true, budget: budget.NewScope(budget.Service, name, &store.Limits{})}
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
	meta := c.meta
	if meta == nil || svc.Name != c.service {
		meta = s.meta(svc.Name)
	}
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
	switch {
	case c.attempt != nil:
		info = c.attempt.Info // the router read the body it sent
	case len(body) > 0:
		info = meter.InspectRequest(body)
	}
	if lists && len(body) > 0 {
		// Only an allow-list reads a form's model fields: the rest of
		// the request reads info, never the body again.
		info.ReadForm(r.Header.Get("Content-Type"), body)
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
		named, err := checkModels(r, meta, p, fam, len(body) > 0, &info)
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
		if b, added := info.WithStreamUsage(body); added {
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

// reserve admits a metered request against the budgets of its token, its
// team and its service (see package budget), recording its holds on c. A
// refusal is 429 budget_exceeded with Retry-After at the end of the
// refusing window; counters that are down and fail closed are 503.
func (s *Server) reserve(ctx context.Context, c *call, service string, meta *svcMeta, estTok, estCost float64) error {
	p := c.principal
	if p.Admin {
		return nil
	}
	var scopes [budget.NumKinds]*budget.Scope
	if p.Token.ID != "" {
		scopes[budget.Token] = s.budgets.Scope(budget.Token, p.Token.ID, &p.Token.Limits)
	}
	if p.Team.ID != "" {
		scopes[budget.Team] = s.budgets.Scope(budget.Team, p.Team.ID, &p.Team.Limits)
	}
	scopes[budget.Service] = meta.budget
	if c.router != "" {
		// A routed request also spends its router's budgets.
		rm := c.routerMeta
		if rm == nil {
			rm = s.meta(c.router)
		}
		scopes[budget.Router] = rm.budget
	}
	if err := s.budgets.Reserve(ctx, &c.budget, scopes, estTok, estCost, s.now()); err != nil {
		return budgetError(err)
	}
	return nil
}

// budgetError maps a refusal by the budgets to its answer: 429
// budget_exceeded with Retry-After at the end of the refusing window, or
// 503 unavailable when the counters are down and budgets fail closed.
func budgetError(err error) error {
	var ref *budget.Refusal
	switch {
	case errors.Is(err, budget.ErrUnavailable):
		return errLimitsUnavailable("budgets")
	case errors.As(err, &ref):
		return &httpx.Error{Status: http.StatusTooManyRequests, Code: httpx.CodeBudgetExceeded, RetryAfter: ref.RetryAfter(), Message: ref.Error()}
	}
	return err
}

// settle charges a finished request's metered tokens and cost to every
// budget counter it holds (0 when nothing was metered).
func (k *counters) settle(c *call, tokens, cost float64, now time.Time) {
	k.budgets.Settle(&c.budget, tokens, cost, now)
}

// seedCounters charges the budget counters with the stored usage of the
// current windows (see [budget.Budgets.Seed]), so a restart does not
// reset a budget. Only the local backend needs it at every start: Redis
// keeps its counts across restarts.
func (k *counters) seedCounters(ctx context.Context) error {
	n, err := k.budgets.Seed(ctx, k.st, k.now())
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	if n > 0 {
		k.log.Info("budgets seeded from stored usage", "counters", n)
	}
	return nil
}

// newBudgets returns the budgets on the server's limiter, counted in its
// metrics.
func (k *counters) newBudgets() *budget.Budgets {
	return budget.New(k.limiter, budget.Config{
		Logger: k.log,
		OnRefused: func(scope budget.Kind, window string, unit budget.Unit) {
			k.metrics.budgetRejections.WithLabelValues(scope.String(), window, unit.String()).Inc()
		},
		OnWarned: func(scope budget.Kind, window string, unit budget.Unit) {
			k.metrics.budgetWarnings.WithLabelValues(scope.String(), window, unit.String()).Inc()
		},
		OnCharged: k.budgetCharged,
	})
}
