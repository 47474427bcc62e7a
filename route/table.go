package route

import (
	"errors"
	"fmt"
	"path"
	"strings"

	"github.com/keypool/keypool/breaker"
	"github.com/keypool/keypool/store"
)

// ErrInvalid is wrapped by every error of [Compile] and [Validate]; the
// rest of the message names the route and target at fault.
var ErrInvalid = errors.New("route: invalid routes")

// MaxRoutes and MaxTargets bound a router's size.
const (
	MaxRoutes  = 256
	MaxTargets = 16
)

// DefaultPath is the path prefix of a [store.Target] without one.
const DefaultPath = "/v1"

// Table is a router's compiled routes: exact model names first, then
// globs in the order they were given. It is immutable and safe for
// concurrent use.
type Table struct {
	exact    map[string]*compiled
	globs    []*compiled
	names    []string // exact route models, in the order given
	settings store.RouterSettings
	// services holds every target service once (see [Table.Services]);
	// a target's svc indexes it.
	services []string
	// breakers holds the breaker of each of services, set by
	// [Handler.SetRouters] on its own copy of the table.
	breakers []*breaker.Breaker
}

// compiled is one route ready to serve.
type compiled struct {
	model   string
	targets []store.Target // paths normalised
	// names holds each target's service as a header value
	// (HeaderService), shared by every answer: full slices, so that an
	// append copies.
	names [][]string
	// prefixes holds each target's proxy path, "/v1/{service}{path}/".
	prefixes []string
	// svc holds each target's index in the table's services (and
	// breakers).
	svc []int
	// weighted counts the leading targets that carry a weight: they
	// are ordered by weight, the rest follow in order.
	weighted int
	total    int // the sum of their weights
}

// CompileRouter compiles a router service's routes (see [Compile]) with
// its settings ([store.RouterSettings]: attempt budget and breakers;
// nil means the [Handler]'s).
func CompileRouter(sv store.Service) (*Table, error) {
	t, err := Compile(sv.Routes)
	if err != nil {
		return nil, err
	}
	if sv.Router != nil {
		t.settings = *sv.Router
	}
	return t, nil
}

// Compile checks routes on their own (see [Validate] for the checks that
// need the other services) and returns their table.
func Compile(routes []store.Route) (*Table, error) {
	if len(routes) == 0 {
		return nil, fmt.Errorf("%w: a router needs at least one route", ErrInvalid)
	}
	if len(routes) > MaxRoutes {
		return nil, fmt.Errorf("%w: %d routes; at most %d", ErrInvalid, len(routes), MaxRoutes)
	}
	t := &Table{exact: map[string]*compiled{}}
	seen := map[string]bool{}
	for i, rt := range routes {
		at := fmt.Sprintf("routes[%d]", i)
		m := rt.Model
		switch {
		case m == "" || strings.TrimSpace(m) != m:
			return nil, fmt.Errorf("%w: %s: model must be a non-empty name or glob without surrounding spaces", ErrInvalid, at)
		case len(m) > 256:
			return nil, fmt.Errorf("%w: %s: model is longer than 256 bytes", ErrInvalid, at)
		case seen[m]:
			return nil, fmt.Errorf("%w: %s: model %q is routed twice", ErrInvalid, at, m)
		}
		seen[m] = true
		glob := isGlob(m)
		if glob {
			if _, err := path.Match(m, ""); err != nil {
				return nil, fmt.Errorf("%w: %s: model %q is not a valid glob (* ? [a-z] \\x)", ErrInvalid, at, m)
			}
		}
		c, err := compileTargets(at, m, rt.Targets)
		if err != nil {
			return nil, err
		}
		if glob {
			t.globs = append(t.globs, c)
		} else {
			t.exact[m] = c
			t.names = append(t.names, m)
		}
	}
	t.indexServices()
	return t, nil
}

// indexServices lists the target services of every route once, exact
// routes first, and gives each target its service's index.
func (t *Table) indexServices() {
	at := map[string]int{}
	index := func(c *compiled) {
		c.svc = make([]int, len(c.targets))
		for i, tg := range c.targets {
			j, ok := at[tg.Service]
			if !ok {
				j = len(t.services)
				at[tg.Service] = j
				t.services = append(t.services, tg.Service)
			}
			c.svc[i] = j
		}
	}
	for _, n := range t.names {
		index(t.exact[n])
	}
	for _, c := range t.globs {
		index(c)
	}
}

func compileTargets(at, model string, targets []store.Target) (*compiled, error) {
	switch {
	case len(targets) == 0:
		return nil, fmt.Errorf("%w: %s (%q): targets must not be empty", ErrInvalid, at, model)
	case len(targets) > MaxTargets:
		return nil, fmt.Errorf("%w: %s (%q): %d targets; at most %d", ErrInvalid, at, model, len(targets), MaxTargets)
	}
	c := &compiled{model: model}
	var plain []store.Target
	for j, tg := range targets {
		tat := fmt.Sprintf("%s.targets[%d]", at, j)
		if tg.Service == "" {
			return nil, fmt.Errorf("%w: %s: service is required", ErrInvalid, tat)
		}
		if tg.Weight < 0 {
			return nil, fmt.Errorf("%w: %s: weight must not be negative", ErrInvalid, tat)
		}
		if tg.Model != "" && (strings.TrimSpace(tg.Model) != tg.Model || isGlob(tg.Model) || len(tg.Model) > 256) {
			return nil, fmt.Errorf("%w: %s: model %q must be a plain model name", ErrInvalid, tat, tg.Model)
		}
		p, err := cleanPath(tg.Path)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, tat, err)
		}
		tg.Path = p
		if tg.Weight > 0 {
			c.targets = append(c.targets, tg)
			c.total += tg.Weight
		} else {
			plain = append(plain, tg)
		}
	}
	c.weighted = len(c.targets)
	c.targets = append(c.targets, plain...)
	for _, tg := range c.targets {
		c.names = append(c.names, []string{tg.Service}[:1:1])
		c.prefixes = append(c.prefixes, "/v1/"+tg.Service+tg.Path+"/")
	}
	return c, nil
}

// cleanPath checks a target's path prefix: absolute, without query,
// dot or empty segments, or escapes; "" is [DefaultPath] and "/" none.
func cleanPath(p string) (string, error) {
	if p == "" {
		return DefaultPath, nil
	}
	if !strings.HasPrefix(p, "/") || strings.ContainsAny(p, "?#%\\ ") || hasControl(p) {
		return "", fmt.Errorf("path %q must be an absolute path such as /v1 or /v1beta/openai", p)
	}
	p = strings.TrimSuffix(p, "/")
	for _, seg := range strings.Split(strings.TrimPrefix(p, "/"), "/") {
		if p != "" && (seg == "" || seg == "." || seg == "..") {
			return "", fmt.Errorf("path %q has an empty or dot segment", p)
		}
	}
	return p, nil
}

func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f {
			return true
		}
	}
	return false
}

// Validate compiles routes and checks every target against the other
// services: lookup returns a service by name. A target must name an
// existing service that is not a router (so routes never loop) and not
// the router itself.
func Validate(router string, routes []store.Route, lookup func(name string) (store.Service, bool)) (*Table, error) {
	t, err := Compile(routes)
	if err != nil {
		return nil, err
	}
	for i, rt := range routes {
		for j, tg := range rt.Targets {
			tat := fmt.Sprintf("routes[%d].targets[%d]", i, j)
			if tg.Service == router {
				return nil, fmt.Errorf("%w: %s: a router cannot route to itself", ErrInvalid, tat)
			}
			svc, ok := lookup(tg.Service)
			switch {
			case !ok:
				return nil, fmt.Errorf("%w: %s: service %q does not exist", ErrInvalid, tat, tg.Service)
			case svc.Kind == store.KindRouter:
				return nil, fmt.Errorf("%w: %s: service %q is a router; a target must be an upstream service", ErrInvalid, tat, tg.Service)
			}
		}
	}
	return t, nil
}

// isGlob reports whether a model pattern has glob syntax.
func isGlob(m string) bool { return strings.ContainsAny(m, "*?[\\") }

// match reports whether model matches the glob pattern, with * and ?
// matching '/' too (model names such as "meta-llama/Llama-3.3-70B").
func match(pattern, model string) bool {
	if strings.IndexByte(pattern, '/') >= 0 || strings.IndexByte(model, '/') >= 0 {
		pattern = strings.ReplaceAll(pattern, "/", "\x00")
		model = strings.ReplaceAll(model, "/", "\x00")
	}
	ok, _ := path.Match(pattern, model)
	return ok
}

// lookup returns the route of model: its exact route, else the first
// glob that matches.
func (t *Table) lookup(model string) *compiled {
	if c := t.exact[model]; c != nil {
		return c
	}
	for _, c := range t.globs {
		if match(c.model, model) {
			return c
		}
	}
	return nil
}

// Routes reports whether a route serves model.
func (t *Table) Routes(model string) bool { return t.lookup(model) != nil }

// Models returns the models of the exact routes (aliases included), in
// the order they were given; globs are not listed. The slice is the
// table's own: callers must not change it.
func (t *Table) Models() []string { return t.names }

// Services returns the target services of every route, each once. The
// slice is the table's own (its breakers are found by position in it):
// callers must not change it.
func (t *Table) Services() []string { return t.services }

// breaker returns the breaker of a route's i-th target, if the table has
// breakers (a table [Handler.SetRouters] made).
func (t *Table) breaker(c *compiled, i int) *breaker.Breaker {
	if t.breakers == nil {
		return nil
	}
	return t.breakers[c.svc[i]]
}
