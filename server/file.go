package server

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/keypool/keypool/route"
	"github.com/keypool/keypool/store"
)

// LoadFile reads a YAML configuration file (KEYPOOL_CONFIG) into a Config.
// See [ParseConfig] for its format; lookup resolves ${ENV} references
// (pass os.LookupEnv).
func LoadFile(path string, lookup func(string) (string, bool)) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("server: config file: %w", err)
	}
	cfg, err := ParseConfig(data, lookup)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig parses a YAML configuration document. Its keys are the yaml
// names of [Config]'s fields (listen, database, services, external, …);
// unknown keys are errors. In every string value, ${NAME} is replaced by
// the environment variable NAME as lookup finds it — an unset variable is
// an error naming it — and $${ is a literal "${". Substitution happens
// after parsing, so a secret's characters never change the document's
// structure.
//
//	services:
//	  - name: openai
//	    base_url: https://api.openai.com
//	    auth_scheme: bearer
//	    keys:
//	      - key_value: ${OPENAI_KEY_1}
//	external:
//	  table: credentials
//	  refresh: 30s
//	  services: {exa: exaai}
func ParseConfig(data []byte, lookup func(string) (string, bool)) (Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return Config{}, fmt.Errorf("yaml: %w", err)
	}
	var cfg Config
	if root.Kind == 0 { // empty document
		return cfg, nil
	}
	if err := expandNode(&root, lookup); err != nil {
		return Config{}, err
	}
	// Re-encode the expanded tree so that the strict decoder (unknown
	// keys are errors) can read it.
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	if err := enc.Encode(&root); err != nil {
		return Config{}, fmt.Errorf("yaml: %w", err)
	}
	_ = enc.Close()
	dec := yaml.NewDecoder(&buf)
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		return Config{}, fmt.Errorf("yaml: %w", err)
	}
	return cfg, nil
}

func expandNode(n *yaml.Node, lookup func(string) (string, bool)) error {
	if n.Kind == yaml.ScalarNode && (n.Tag == "!!str" || n.Tag == "" || n.Style != 0) && strings.Contains(n.Value, "$") {
		v, err := expandEnv(n.Value, lookup)
		if err != nil {
			return fmt.Errorf("line %d: %w", n.Line, err)
		}
		if v != n.Value {
			n.Value = v
			// Keep it a string: "${PORT}" expanding to "8080" still
			// decodes into numeric fields through the retyped tag below.
			n.Tag = ""
			n.Style = yaml.DoubleQuotedStyle
			if isPlainScalar(v) {
				n.Style = 0
			}
		}
	}
	for _, c := range n.Content {
		if err := expandNode(c, lookup); err != nil {
			return err
		}
	}
	return nil
}

// isPlainScalar reports whether v looks like a number or boolean, so that
// "${N}" can fill an int field.
func isPlainScalar(v string) bool {
	if v == "true" || v == "false" {
		return true
	}
	if v == "" {
		return false
	}
	for i, r := range v {
		if (r < '0' || r > '9') && r != '.' && !(i == 0 && r == '-') {
			return false
		}
	}
	return true
}

// expandEnv replaces ${NAME} with its value; $${ is a literal "${". Other
// uses of $ are left as they are.
func expandEnv(s string, lookup func(string) (string, bool)) (string, error) {
	var b strings.Builder
	for i := 0; i < len(s); {
		switch {
		case strings.HasPrefix(s[i:], "$${"):
			b.WriteString("${")
			i += 3
		case strings.HasPrefix(s[i:], "${"):
			end := strings.IndexByte(s[i:], '}')
			if end < 0 {
				return "", fmt.Errorf("unterminated ${ reference")
			}
			name := s[i+2 : i+end]
			if !validEnvName(name) {
				return "", fmt.Errorf("bad variable name %q in ${...}", name)
			}
			v, ok := lookup(name)
			if !ok {
				return "", fmt.Errorf("environment variable %s is not set", name)
			}
			b.WriteString(v)
			i += end + 1
		default:
			b.WriteByte(s[i])
			i++
		}
	}
	return b.String(), nil
}

func validEnvName(n string) bool {
	if n == "" {
		return false
	}
	for i, r := range n {
		switch {
		case r == '_', r >= 'A' && r <= 'Z', r >= 'a' && r <= 'z':
		case r >= '0' && r <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

// serviceWriter is what applyServices needs of a store.
type serviceWriter interface {
	Services(ctx context.Context) ([]store.Service, error)
	GetService(ctx context.Context, name string) (store.Service, error)
	CreateService(ctx context.Context, s *store.Service) error
	UpdateService(ctx context.Context, s *store.Service) error
	CreateKeys(ctx context.Context, keys []*store.Key) error
}

// applyServices creates or updates the services declared in the
// configuration and adds their keys. A key whose value its service
// already holds is left as it is.
func applyServices(ctx context.Context, st serviceWriter, specs []ServiceSpec, v store.Validator, log *slog.Logger) error {
	// Routers last, so that their routes can name the services declared
	// beside them.
	specs = slices.Clone(specs)
	slices.SortStableFunc(specs, func(a, b ServiceSpec) int {
		return cmp.Compare(boolInt(a.Kind == store.KindRouter), boolInt(b.Kind == store.KindRouter))
	})
	for _, sp := range specs {
		rec, keys, err := sp.records(v)
		if err != nil {
			return fmt.Errorf("server: config %w", err)
		}
		if rec.Kind == store.KindRouter {
			if err := checkRoutes(ctx, st, rec); err != nil {
				return err
			}
		}
		old, err := st.GetService(ctx, sp.Name)
		switch {
		case errors.Is(err, store.ErrNotFound):
			if err := st.CreateService(ctx, &rec); err != nil {
				return fmt.Errorf("server: config service %q: %w", sp.Name, err)
			}
			log.Info("config: service created", "service", sp.Name)
		case err != nil:
			return fmt.Errorf("server: config service %q: %w", sp.Name, err)
		default:
			declared := rec.Limits
			rec.Limits = old.Limits
			if declared.RPMLimit != 0 {
				rec.Limits.RPMLimit = declared.RPMLimit
			}
			if len(declared.ModelsEnabled) > 0 {
				rec.Limits.ModelsEnabled = declared.ModelsEnabled
			}
			if rec.Prices == "" {
				rec.Prices = old.Prices
			}
			if rec.LLMFamily == "" {
				rec.LLMFamily = old.LLMFamily
			}
			if rec.Description == "" {
				rec.Description = old.Description
			}
			if sp.IsActive == nil {
				rec.Disabled = old.Disabled
			}
			for _, d := range [...]struct{ dst, old *time.Duration }{
				{&rec.HeaderTimeout, &old.HeaderTimeout}, {&rec.IdleTimeout, &old.IdleTimeout}, {&rec.RequestTimeout, &old.RequestTimeout},
			} {
				if *d.dst == 0 {
					*d.dst = *d.old
				}
			}
			rec.CreatedAt = old.CreatedAt
			if err := st.UpdateService(ctx, &rec); err != nil {
				return fmt.Errorf("server: config service %q: %w", sp.Name, err)
			}
		}
		added := 0
		for i, k := range keys {
			err := st.CreateKeys(ctx, []*store.Key{k})
			switch {
			case errors.Is(err, store.ErrConflict):
			case err != nil:
				return fmt.Errorf("server: config service %q: keys[%d]: %w", sp.Name, i, err)
			default:
				added++
			}
		}
		if added > 0 {
			log.Info("config: keys added", "service", sp.Name, "keys", added)
		}
	}
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// checkRoutes validates a router's routes against the services in the
// store (see route.Validate).
func checkRoutes(ctx context.Context, st serviceWriter, rec store.Service) error {
	ss, err := st.Services(ctx)
	if err != nil {
		return fmt.Errorf("server: config service %q: %w", rec.Name, err)
	}
	_, err = route.Validate(rec.Name, rec.Routes, func(name string) (store.Service, bool) {
		for _, sv := range ss {
			if sv.Name == name {
				return sv, true
			}
		}
		return store.Service{}, false
	})
	if err != nil {
		return fmt.Errorf("server: config service %q: %w", rec.Name, err)
	}
	return nil
}
