package store_test

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
)

// first makes the selector registered as "first" in these tests.
func first() keypool.Selector { return &keypool.Ordered{} }

func TestRegistryNamesResolveInValidatorAndPool(t *testing.T) {
	classify := func(*http.Response, error) keypool.Outcome { return keypool.Outcome{Kind: keypool.OK} }
	reg := &store.Registry{
		Selectors:   map[string]func() keypool.Selector{"First": first},
		AuthSchemes: map[string]keypool.AuthScheme{"vendor-auth": keypool.XAPIKey},
		Classifiers: map[string]keypool.Classifier{"lenient": classify},
	}
	if err := reg.Check(); err != nil {
		t.Fatal(err)
	}
	s := store.Service{Name: "svc", BaseURL: "https://api.example.com/", Selector: " FIRST ", AuthScheme: "Vendor-Auth",
		KeyPolicy: store.KeyPolicy{Classifier: "lenient"}}
	if err := (store.Validator{Registry: reg}).Service(&s); err != nil {
		t.Fatal(err)
	}
	if s.Selector != "first" || s.AuthScheme != "vendor-auth" || s.Classifier != "lenient" || s.BaseURL != "https://api.example.com" {
		t.Errorf("normalised service: %+v", s)
	}
	ps, _, err := reg.ToPool(s, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ps.Selector.(*keypool.Ordered); !ok || ps.Auth != keypool.XAPIKey || ps.Classifier == nil {
		t.Errorf("pool service: selector %T, auth %v, classifier set %v", ps.Selector, ps.Auth, ps.Classifier != nil)
	}

	// Without the registry the same names are refused, naming the field.
	for _, tc := range []struct {
		mutate func(*store.Service)
		want   string
	}{
		{func(s *store.Service) { s.Selector = "first" }, `selector: unknown selector "first"`},
		{func(s *store.Service) { s.AuthScheme = "vendor-auth" }, `unknown auth_scheme "vendor-auth"`},
		{func(s *store.Service) { s.Classifier = "lenient" }, `classifier: unknown classifier "lenient"`},
	} {
		bad := store.Service{Name: "svc", BaseURL: "https://api.example.com"}
		tc.mutate(&bad)
		err := store.Validator{}.Service(&bad)
		var ve *store.ValidationError
		if !errors.As(err, &ve) || !errors.Is(err, store.ErrInvalid) || !strings.HasPrefix(ve.Message, tc.want) {
			t.Errorf("built-ins only: %v, want a ValidationError starting %q", err, tc.want)
		}
	}
	// An unknown name lists the registered ones.
	bad := store.Service{Name: "svc", BaseURL: "https://api.example.com", Selector: "fastest"}
	if err := (store.Validator{Registry: reg}).Service(&bad); err == nil || !strings.Contains(err.Error(), "ordered, first)") {
		t.Errorf("unknown selector with a registry: %v", err)
	}
}

func TestRegistryCheckRefusesClashingNames(t *testing.T) {
	mk := first
	for _, tc := range []struct {
		name string
		reg  store.Registry
		want string
	}{
		{"built-in selector", store.Registry{Selectors: map[string]func() keypool.Selector{"Weighted": mk}}, "built-in"},
		{"built-in auth scheme", store.Registry{AuthSchemes: map[string]keypool.AuthScheme{"bearer": keypool.Bearer}}, "built-in"},
		{"same name twice", store.Registry{Selectors: map[string]func() keypool.Selector{"a": mk, "A": mk}}, "twice"},
		{"empty name", store.Registry{Classifiers: map[string]keypool.Classifier{" ": func(*http.Response, error) keypool.Outcome { return keypool.Outcome{} }}}, "empty"},
		{"nil value", store.Registry{Classifiers: map[string]keypool.Classifier{"x": nil}}, "nil"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.reg.Check()
			if !errors.Is(err, keypool.ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Check() = %v, want ErrInvalidConfig mentioning %q", err, tc.want)
			}
		})
	}
}
