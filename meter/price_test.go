package meter

import (
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestDefaultPrices(t *testing.T) {
	p := DefaultPrices()
	if p.Len() < 40 {
		t.Fatalf("only %d models", p.Len())
	}
	for _, m := range []string{"gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini",
		"gpt-5", "gpt-5-mini", "gpt-5-nano", "claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5",
		"claude-3-7-sonnet", "claude-3-5-sonnet", "claude-3-5-haiku", "gemini-2.0-flash", "gemini-2.5-pro",
		"gemini-2.5-flash", "gemini-2.5-flash-lite", "llama-3.3-70b-versatile", "llama-3.1-8b-instant"} {
		pr, ok := p.Lookup(m)
		if !ok || pr.Input <= 0 || pr.Output <= 0 {
			t.Errorf("%s: %+v %v", m, pr, ok)
		}
	}
}

func TestLookup(t *testing.T) {
	p := DefaultPrices()
	cases := map[string]string{ // model → the entry it must resolve to
		"gpt-4o-2024-08-06":              "gpt-4o",
		"gpt-4o-mini-2024-07-18":         "gpt-4o-mini",
		"GPT-4o":                         "gpt-4o",
		"gpt-4.1-nano-2025-04-14":        "gpt-4.1-nano",
		"gpt-5-chat-latest":              "gpt-5",
		"o3-mini-2025-01-31":             "o3-mini",
		"claude-sonnet-4-20250514":       "claude-sonnet-4",
		"claude-sonnet-4-5-20250929":     "claude-sonnet-4-5",
		"claude-opus-4-1-20250805":       "claude-opus-4-1",
		"claude-3-5-haiku-latest":        "claude-3-5-haiku",
		"claude-sonnet-4@20250514":       "claude-sonnet-4",
		"gemini-2.5-flash-lite":          "gemini-2.5-flash-lite",
		"gemini-2.5-flash-preview-05-20": "gemini-2.5-flash",
		"models/gemini-2.0-flash-001":    "gemini-2.0-flash",
		"openai/gpt-4o":                  "gpt-4o",
		"openai/gpt-oss-120b":            "openai/gpt-oss-120b",
	}
	for model, entry := range cases {
		got, ok := p.Lookup(model)
		want, _ := p.Lookup(entry)
		if !ok || got != want {
			t.Errorf("Lookup(%q) = %+v, %v; want %s %+v", model, got, ok, entry, want)
		}
	}
	for _, model := range []string{"", "llama", "gpt-4omni", "unknown-model"} {
		if pr, ok := p.Lookup(model); ok {
			t.Errorf("Lookup(%q) = %+v, want no match", model, pr)
		}
	}
	// gpt-4 must not swallow gpt-4.5 or gpt-4o variants it does not know.
	if pr, ok := p.Lookup("gpt-4.5-preview"); ok {
		t.Errorf("gpt-4.5-preview matched %+v", pr)
	}
	var nilTable *PriceTable
	if _, ok := nilTable.Lookup("gpt-4o"); ok {
		t.Error("nil table matched")
	}
}

func TestMerge(t *testing.T) {
	base := DefaultPrices()
	over := map[string]Price{"GPT-4o": {Input: 1, Output: 2}, "my-finetune": {Input: 3, Output: 4}}
	m := base.Merge(over)
	if got, _ := m.Lookup("gpt-4o-2024-08-06"); got != (Price{Input: 1, Output: 2}) {
		t.Errorf("override: %+v", got)
	}
	if got, _ := m.Lookup("my-finetune"); got.Input != 3 {
		t.Errorf("added: %+v", got)
	}
	if got, _ := base.Lookup("gpt-4o"); got.Input != 2.5 {
		t.Errorf("base changed: %+v", got)
	}
	if m.Len() != base.Len()+1 {
		t.Errorf("len %d, base %d", m.Len(), base.Len())
	}
}

func TestParsePrices(t *testing.T) {
	yamlDoc := "models:\n  acme-1: {input: 1.5, output: 3, cached_input: 0.5}\n"
	jsonBare := `{"acme-1": {"input": 1.5, "output": 3, "cached_input": 0.5}}`
	for _, doc := range []string{yamlDoc, jsonBare} {
		m, err := ParsePrices([]byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		if m["acme-1"] != (Price{Input: 1.5, Output: 3, CachedInput: 0.5}) {
			t.Errorf("%q: %+v", doc, m)
		}
	}
	for _, bad := range []string{`{"acme": {"inptu": 1}}`, `{"acme": {"input": -1}}`, "models: [1, 2]", "{"} {
		if _, err := ParsePrices([]byte(bad)); err == nil {
			t.Errorf("ParsePrices(%q): no error", bad)
		}
	}
	if m, err := ParsePrices(nil); err != nil || len(m) != 0 {
		t.Errorf("empty: %v %v", m, err)
	}
	path := filepath.Join(t.TempDir(), "prices.yaml")
	if err := os.WriteFile(path, DefaultPricesYAML(), 0o600); err != nil {
		t.Fatal(err)
	}
	m, ign, err := LoadPriceFile(path)
	if err != nil || len(m) != DefaultPrices().Len() || len(ign) != 0 {
		t.Fatalf("LoadPriceFile: %d entries, %v", len(m), err)
	}
	if _, _, err := LoadPriceFile(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Error("missing file: no error")
	}
}

func TestCost(t *testing.T) {
	p := Price{Input: 3, Output: 15, CachedInput: 0.3, CacheWrite: 3.75}
	cases := []struct {
		name string
		u    Usage
		p    Price
		want float64
	}{
		{"plain", Usage{InputTokens: 1_000_000, OutputTokens: 1_000_000}, p, 18},
		{"cached not double counted", Usage{InputTokens: 1_000_000, CachedTokens: 1_000_000}, p, 0.3},
		{"cache write", Usage{InputTokens: 2_000_000, CacheWriteTokens: 1_000_000}, p, 6.75},
		{"cached falls back to input", Usage{InputTokens: 1_000_000, CachedTokens: 500_000}, Price{Input: 2}, 2},
		{"cached > input clamped", Usage{InputTokens: 10, CachedTokens: 1_000_000}, p, 10 * 0.3 / 1e6},
		{"negative clamped", Usage{InputTokens: -5, OutputTokens: -5}, p, 0},
		{"per unit", Usage{Images: 2, Characters: 1000}, Price{PerImage: 0.04, PerCharacter: 0.000015, PerRequest: 0.001}, 0.08 + 0.015 + 0.001},
	}
	for _, tc := range cases {
		if got := Cost(tc.u, tc.p); math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("%s: Cost = %v, want %v", tc.name, got, tc.want)
		}
	}
	if _, ok := DefaultPrices().Cost(Usage{Model: "no-such-model"}); ok {
		t.Error("priced an unknown model")
	}
}

// TestLoadModelFile: another gateway's model file (description,
// cost_per_million_tokens, structure, module) loads; the unknown keys
// are returned, not fatal; a negative price still is.
func TestLoadModelFile(t *testing.T) {
	doc := `# Example: google.yaml
models:
  gemini-2.0-flash:
    structure: "gemini_text"
    module: "google.gemini_text"
    description: "Fast text generation model"
    cost_per_million_tokens:
      input: 0.075
      output: 0.3

  gemini-3-pro-image-preview:
    structure: "gemini_image_generation"
    module: "google.gemini_image"
    description: "Image generation model"
    cost_per_million_tokens:
      input: 0.0
      output: 0.039  # Per image
`
	dir := t.TempDir()
	path := filepath.Join(dir, "google.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	m, ign, err := LoadPriceFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := m["gemini-2.0-flash"]; got != (Price{Input: 0.075, Output: 0.3, Description: "Fast text generation model"}) {
		t.Errorf("gemini-2.0-flash: %+v", got)
	}
	if got := m["gemini-3-pro-image-preview"]; got.Output != 0.039 || got.Description != "Image generation model" {
		t.Errorf("image model: %+v", got)
	}
	want := []string{"gemini-2.0-flash.module", "gemini-2.0-flash.structure", "gemini-3-pro-image-preview.module", "gemini-3-pro-image-preview.structure"}
	if !slices.Equal(ign, want) {
		t.Errorf("ignored %v, want %v", ign, want)
	}
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("models:\n  x: {cost_per_million_tokens: {input: -1}}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadPriceFile(bad); err == nil {
		t.Error("negative price in a model file: no error")
	}
}
