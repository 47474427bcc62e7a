package server

import (
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/budget"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/limit"
)

// metrics are keypoold's Prometheus collectors, on a registry of their
// own. Labels carry service names, key ids, error codes and limit scopes:
// never a secret, a token or a team name typed by a client.
type metrics struct {
	reg *prometheus.Registry

	requests          *prometheus.CounterVec   // service, status, code
	upstreamLatency   *prometheus.HistogramVec // service
	requestLatency    *prometheus.HistogramVec // service
	retries           *prometheus.CounterVec   // service
	cooldowns         *prometheus.CounterVec   // service, key_id
	stateChanges      *prometheus.CounterVec   // service, state
	holds             *prometheus.CounterVec   // service, kind
	limiterRejections *prometheus.CounterVec   // scope
	leases            *prometheus.CounterVec   // service, result
	reports           *prometheus.CounterVec   // outcome
	usageDropped      prometheus.CounterFunc
	eventsDropped     prometheus.Counter
	streamsEnded      prometheus.Counter
	budgetWarnings    *prometheus.CounterVec // scope, window, unit
	budgetRejections  *prometheus.CounterVec // scope, window, unit
	meteredTokens     *prometheus.CounterVec // service, direction
	meteredCost       *prometheus.CounterVec // service

	// Caches of metric children on the request path. Their keys are
	// service names the pool knows (bounded by configuration), statuses
	// and error codes.
	requestCache sync.Map // requestLabels → prometheus.Counter
	serviceCache sync.Map // service name → *perService
}

func newMetrics(pool *keypool.Pool, usageDropped func() float64) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_requests_total",
		Help: "Proxied requests by service, HTTP status and keypool error code (empty when the upstream answered).",
	}, []string{"service", "status", "code"})
	m.upstreamLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "keypool_upstream_duration_seconds",
		Help:    "Time from sending a request upstream to its response headers, per attempt.",
		Buckets: prometheus.ExponentialBuckets(0.005, 2, 14), // 5ms … 41s
	}, []string{"service"})
	m.requestLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "keypool_request_duration_seconds",
		Help:    "Time to serve a proxied request, retries included, until the response ended.",
		Buckets: prometheus.ExponentialBuckets(0.005, 2, 14),
	}, []string{"service"})
	m.retries = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_retries_total",
		Help: "Requests retried on another key after a failed attempt.",
	}, []string{"service"})
	m.cooldowns = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_key_cooldowns_total",
		Help: "Times a key started cooling down after an upstream 429.",
	}, []string{"service", "key_id"})
	m.holds = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_key_holds_total",
		Help: "Times a key was kept in rotation against the evidence, by kind: floor (confirmed refusals would cross min_active_keys) or ejection_cap (a breaker trip beyond max_ejection_percent).",
	}, []string{"service", "kind"})
	m.stateChanges = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_key_state_changes_total",
		Help: "Key state transitions by the state entered.",
	}, []string{"service", "state"})
	m.limiterRejections = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_limiter_rejections_total",
		Help: "Client requests refused by a team, token or service rpm_limit.",
	}, []string{"scope"})
	m.leases = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_leases_total",
		Help: "GET /key leases by service and result (ok, no_key_available, unknown_service).",
	}, []string{"service", "result"})
	m.reports = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_lease_reports_total",
		Help: "POST /key/{id}/report calls by outcome.",
	}, []string{"outcome"})
	m.usageDropped = prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "keypool_usage_records_dropped_total",
		Help: "Usage records lost because the store could not take them.",
	}, usageDropped)
	m.eventsDropped = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keypool_key_events_dropped_total",
		Help: "Key state changes not persisted because the persistence queue was full.",
	})
	m.streamsEnded = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keypool_requests_revoked_total",
		Help: "Open proxied requests (streams, WebSockets) ended because their token, team, user or key was revoked.",
	})
	m.budgetWarnings = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_budget_warnings_total",
		Help: "Requests admitted past a budget's warn threshold, by scope (token, team, service), window and unit (tokens, cost).",
	}, []string{"scope", "window", "unit"})
	m.budgetRejections = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_budget_rejections_total",
		Help: "Requests refused 429 budget_exceeded, by scope, window and unit.",
	}, []string{"scope", "window", "unit"})
	m.meteredTokens = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_metered_tokens_total",
		Help: "LLM tokens metered on proxied responses, by service and direction (input, output).",
	}, []string{"service", "direction"})
	m.meteredCost = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keypool_metered_cost_usd_total",
		Help: "Cost in USD of the LLM usage metered on proxied responses, by service.",
	}, []string{"service"})
	m.reg.MustRegister(
		m.budgetWarnings, m.budgetRejections, m.meteredTokens, m.meteredCost,
		m.requests, m.upstreamLatency, m.requestLatency, m.retries, m.cooldowns,
		m.stateChanges, m.holds, m.limiterRejections, m.leases, m.reports,
		m.usageDropped, m.eventsDropped, m.streamsEnded,
		&keyCollector{pool: pool},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	m.preinit()
	return m
}

// preinit creates the zero series of the counter families whose labels
// are known in advance, so that every family the README lists is exported
// from the first scrape (dashboards and alerts on rate() see a 0, not an
// absent series). Per-service series start with the service
// ([metrics.service]).
func (m *metrics) preinit() {
	for _, scope := range []string{"auth_failures", "token", "team", "service"} {
		m.limiterRejections.WithLabelValues(scope)
	}
	for scope := budget.Token; scope <= budget.Service; scope++ {
		for w := limit.Minute; w <= limit.Total; w++ {
			for _, u := range []budget.Unit{budget.Tokens, budget.Cost} {
				m.budgetWarnings.WithLabelValues(scope.String(), w.String(), u.String())
				m.budgetRejections.WithLabelValues(scope.String(), w.String(), u.String())
			}
		}
	}
	m.leases.WithLabelValues("unknown", httpx.CodeUnknownService)
	for k := keypool.OK; k <= keypool.Refused; k++ {
		m.reports.WithLabelValues(k.String())
	}
}

// key creates the zero series of a key's counters, so that
// keypool_key_cooldowns_total is exported before the key first cools.
func (m *metrics) key(service, keyID string) {
	m.cooldowns.WithLabelValues(service, keyID)
}

// onEvent counts a key state change.
func (m *metrics) onEvent(e keypool.Event) {
	m.stateChanges.WithLabelValues(e.Service, e.State.String()).Inc()
	if e.State == keypool.StateCooling {
		m.cooldowns.WithLabelValues(e.Service, e.KeyID).Inc()
	}
}

type requestLabels struct {
	service string
	status  int
	code    string
}

// request counts one proxied request. Children are cached: looking one up
// by its labels hashes them and formats the status on every call.
func (m *metrics) request(service string, status int, code string) {
	l := requestLabels{service, status, code}
	if c, ok := m.requestCache.Load(l); ok {
		c.(prometheus.Counter).Inc()
		return
	}
	c := m.requests.WithLabelValues(service, strconv.Itoa(status), code)
	m.requestCache.Store(l, c)
	c.Inc()
}

// perService holds a service's cached metric children.
type perService struct {
	upstream  prometheus.Observer
	duration  prometheus.Observer
	retries   prometheus.Counter
	tokensIn  prometheus.Counter
	tokensOut prometheus.Counter
	cost      prometheus.Counter
}

func (m *metrics) service(name string) *perService {
	if p, ok := m.serviceCache.Load(name); ok {
		return p.(*perService)
	}
	p := &perService{
		upstream:  m.upstreamLatency.WithLabelValues(name),
		duration:  m.requestLatency.WithLabelValues(name),
		retries:   m.retries.WithLabelValues(name),
		tokensIn:  m.meteredTokens.WithLabelValues(name, "input"),
		tokensOut: m.meteredTokens.WithLabelValues(name, "output"),
		cost:      m.meteredCost.WithLabelValues(name),
	}
	for _, result := range []string{"ok", httpx.CodeNoKeyAvailable, httpx.CodeUpstreamUnavailable} {
		m.leases.WithLabelValues(name, result)
	}
	m.requests.WithLabelValues(name, "200", "")
	for _, st := range allStates {
		m.stateChanges.WithLabelValues(name, st.String())
	}
	for _, kind := range []string{keypool.HoldFloor, keypool.HoldEjectionCap} {
		m.holds.WithLabelValues(name, kind)
	}
	m.serviceCache.Store(name, p)
	return p
}

var (
	keyStateDesc = prometheus.NewDesc("keypool_key_state",
		"1 for the state each key is in (active, cooling, open, invalid, exhausted, disabled; a half-open key shows as open while its breaker probes, as active after a cooldown), 0 for the others.",
		[]string{"service", "key_id", "state"}, nil)
	keyInFlightDesc = prometheus.NewDesc("keypool_key_in_flight",
		"Requests using the key now.", []string{"service", "key_id"}, nil)
	keyRPMDesc = prometheus.NewDesc("keypool_key_requests_last_minute",
		"Requests sent with the key in the last minute.", []string{"service", "key_id"}, nil)
	keyRemainingDesc = prometheus.NewDesc("keypool_key_balance_remaining",
		"The key's balance or quota left, in its unit; absent when unknown.", []string{"service", "key_id"}, nil)
)

// allStates are the states keypool_key_state reports: the admin API's
// names, where half-open shows as open (a breaker's probe) or active (a
// probe after a cooldown or quota reset), see [metricState].
var allStates = []keypool.State{
	keypool.StateActive, keypool.StateCooling, keypool.StateOpen,
	keypool.StateInvalid, keypool.StateExhausted, keypool.StateDisabled,
}

// metricState maps a key's live state to the name the admin API shows:
// half-open is "open" while its breaker probes, "active" while it probes
// after a cooldown or quota reset.
func metricState(k keypool.KeyStats) keypool.State {
	if k.State != keypool.StateHalfOpen {
		return k.State
	}
	if k.Breaker == "half_open" {
		return keypool.StateOpen
	}
	return keypool.StateActive
}

// keyCollector reports every key's live state at scrape time, from
// Pool.Stats (ids and hints only; the hint is not exported either).
type keyCollector struct{ pool *keypool.Pool }

func (c *keyCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- keyStateDesc
	ch <- keyInFlightDesc
	ch <- keyRPMDesc
	ch <- keyRemainingDesc
}

func (c *keyCollector) Collect(ch chan<- prometheus.Metric) {
	for _, svc := range c.pool.Services() {
		stats, ok := c.pool.Stats(svc)
		if !ok {
			continue
		}
		for _, k := range stats {
			cur := metricState(k)
			for _, st := range allStates {
				v := 0.0
				if cur == st {
					v = 1
				}
				ch <- prometheus.MustNewConstMetric(keyStateDesc, prometheus.GaugeValue, v, svc, k.ID, st.String())
			}
			ch <- prometheus.MustNewConstMetric(keyInFlightDesc, prometheus.GaugeValue, float64(k.InFlight), svc, k.ID)
			ch <- prometheus.MustNewConstMetric(keyRPMDesc, prometheus.GaugeValue, float64(k.RequestsLastMinute), svc, k.ID)
			if k.Remaining >= 0 {
				ch <- prometheus.MustNewConstMetric(keyRemainingDesc, prometheus.GaugeValue, k.Remaining, svc, k.ID)
			}
		}
	}
}

// onHold is the pool's OnHold hook: a key kept in rotation against the
// evidence (the min_active_keys floor, the max_ejection_percent cap) is
// logged and counted.
func (s *Server) onHold(h keypool.Hold) {
	s.metrics.holds.WithLabelValues(h.Service, h.Kind).Inc()
	s.log.Warn("key kept in rotation", "service", h.Service, "key_id", h.KeyID, "kind", h.Kind, "reason", h.Reason)
}
