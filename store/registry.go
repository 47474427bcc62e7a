package store

import (
	"fmt"
	"slices"
	"strings"

	"github.com/keypool/keypool"
)

// Registry resolves the policy names a [Service] carries (its selector,
// auth_scheme and classifier) to the pool's types: the built-in names
// ([keypool.ParseSelector], [keypool.ParseAuthScheme]) and the names
// registered in its maps. The validator ([Validator.Service]) and the
// syncer ([SyncerOptions.Registry]) read the same Registry, so a name the
// admin API or the configuration file accepts is one the pool can load.
//
// Registered names are matched in lower case, after trimming spaces; a
// registered name must not be a built-in one (see [Registry.Check]). A
// nil *Registry knows the built-in names only. A Registry must not change
// while it is in use.
type Registry struct {
	// Selectors makes a new selector for a service, by name. A service
	// keeps its selector while its selector name is unchanged.
	Selectors map[string]func() keypool.Selector
	// AuthSchemes are auth schemes by name.
	AuthSchemes map[string]keypool.AuthScheme
	// Classifiers decide what an upstream answer says about a key, by
	// name. A service with no classifier uses [keypool.Classify].
	Classifiers map[string]keypool.Classifier
}

// normName is the form names are matched in.
func normName(name string) string { return strings.ToLower(strings.TrimSpace(name)) }

// Check reports a registered name that is empty, clashes with a built-in
// name or another registered name in lower case, or has no value.
func (r *Registry) Check() error {
	if r == nil {
		return nil
	}
	for _, kind := range []struct {
		what    string
		names   []string
		builtin func(string) bool
		nilAt   func(string) bool
	}{
		{"selector", keysOf(r.Selectors), func(n string) bool { _, err := keypool.ParseSelector(n); return err == nil },
			func(n string) bool { return r.Selectors[n] == nil }},
		{"auth_scheme", keysOf(r.AuthSchemes), func(n string) bool { _, err := keypool.ParseAuthScheme(n); return err == nil },
			func(n string) bool { return r.AuthSchemes[n] == nil }},
		{"classifier", keysOf(r.Classifiers), func(string) bool { return false },
			func(n string) bool { return r.Classifiers[n] == nil }},
	} {
		seen := map[string]bool{}
		for _, n := range kind.names {
			switch {
			case normName(n) == "":
				return fmt.Errorf("%w: a registered %s name is empty", keypool.ErrInvalidConfig, kind.what)
			case kind.builtin(n):
				return fmt.Errorf("%w: registered %s %q is a built-in name", keypool.ErrInvalidConfig, kind.what, n)
			case seen[normName(n)]:
				return fmt.Errorf("%w: %s %q is registered twice", keypool.ErrInvalidConfig, kind.what, normName(n))
			case kind.nilAt(n):
				return fmt.Errorf("%w: registered %s %q is nil", keypool.ErrInvalidConfig, kind.what, n)
			}
			seen[normName(n)] = true
		}
	}
	return nil
}

// keysOf returns m's keys, sorted.
func keysOf[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// lookup finds name among m's keys in lower case.
func lookup[V any](m map[string]V, name string) (V, string, bool) {
	n := normName(name)
	for k, v := range m {
		if normName(k) == n {
			return v, n, true
		}
	}
	var zero V
	return zero, "", false
}

// registered lists m's names in lower case, sorted, for error messages.
func registered[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, normName(k))
	}
	slices.Sort(out)
	return out
}

// Selector returns a new selector named name and its canonical name: a
// registered name in lower case, or a built-in one as written, trimmed
// and in lower case. "" means round_robin.
func (r *Registry) Selector(name string) (keypool.Selector, string, error) {
	if r != nil && len(r.Selectors) > 0 {
		if mk, n, ok := lookup(r.Selectors, name); ok {
			return mk(), n, nil
		}
	}
	sel, err := keypool.ParseSelector(name)
	if err != nil {
		if r != nil && len(r.Selectors) > 0 {
			return nil, "", fmt.Errorf("%w: unknown selector %q (want one of %s)", keypool.ErrInvalidConfig, name,
				strings.Join(append(slices.Clone(keypool.SelectorNames), registered(r.Selectors)...), ", "))
		}
		return nil, "", err
	}
	return sel, normName(name), nil
}

// AuthScheme returns the auth scheme named name and its canonical name
// (a registered name in lower case, or the built-in scheme's Name). ""
// means bearer.
func (r *Registry) AuthScheme(name string) (keypool.AuthScheme, string, error) {
	if r != nil && len(r.AuthSchemes) > 0 {
		if a, n, ok := lookup(r.AuthSchemes, name); ok {
			return a, n, nil
		}
	}
	a, err := keypool.ParseAuthScheme(name)
	if err != nil {
		if r != nil && len(r.AuthSchemes) > 0 && !strings.Contains(name, ":") {
			return nil, "", fmt.Errorf("%w: unknown auth_scheme %q (want one of %s, header:<Name> or query:<name>)", keypool.ErrInvalidConfig, name,
				strings.Join(append(slices.Clone(keypool.AuthSchemeNames), registered(r.AuthSchemes)...), ", "))
		}
		return nil, "", err
	}
	return a, a.Name(), nil
}

// Classifier returns the classifier named name and its canonical name;
// "" means none (nil: the proxy's default, [keypool.Classify]).
func (r *Registry) Classifier(name string) (keypool.Classifier, string, error) {
	if normName(name) == "" {
		return nil, "", nil
	}
	if r != nil {
		if c, n, ok := lookup(r.Classifiers, name); ok {
			return c, n, nil
		}
	}
	var names []string
	if r != nil {
		names = registered(r.Classifiers)
	}
	if len(names) == 0 {
		return nil, "", fmt.Errorf("%w: unknown classifier %q (none is registered; leave it empty for the default)", keypool.ErrInvalidConfig, name)
	}
	return nil, "", fmt.Errorf("%w: unknown classifier %q (want one of %s, or empty for the default)", keypool.ErrInvalidConfig, name, strings.Join(names, ", "))
}
