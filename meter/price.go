package meter

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strings"
	"sync"

	"gopkg.in/yaml.v3"
)

// Price is what one model costs. Token prices are in USD per million
// tokens; the others in USD per unit. A zero field is free, except that a
// zero CachedInput or CacheWrite falls back to Input (see [Cost]).
type Price struct {
	// Input is the price of uncached input tokens.
	Input float64 `json:"input,omitempty" yaml:"input,omitempty"`
	// Output is the price of output tokens, reasoning included.
	Output float64 `json:"output,omitempty" yaml:"output,omitempty"`
	// CachedInput is the price of input tokens read from a prompt cache.
	// If zero, Input.
	CachedInput float64 `json:"cached_input,omitempty" yaml:"cached_input,omitempty"`
	// CacheWrite is the price of input tokens written to a prompt cache
	// (Anthropic). If zero, Input.
	CacheWrite float64 `json:"cache_write,omitempty" yaml:"cache_write,omitempty"`
	// PerImage is the price of one generated image.
	PerImage float64 `json:"per_image,omitempty" yaml:"per_image,omitempty"`
	// PerCharacter is the price of one input character (text to speech).
	PerCharacter float64 `json:"per_character,omitempty" yaml:"per_character,omitempty"`
	// PerRequest is a flat price per request (search and scrape APIs).
	PerRequest float64 `json:"per_request,omitempty" yaml:"per_request,omitempty"`
	// Description says what the model is for (GET /services lists it).
	Description string `json:"description,omitempty" yaml:"description,omitempty"`
}

func (p Price) validate() error {
	for _, v := range [...]float64{p.Input, p.Output, p.CachedInput, p.CacheWrite, p.PerImage, p.PerCharacter, p.PerRequest} {
		if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
			return errors.New("prices must be finite and not negative")
		}
	}
	return nil
}

// PriceTable maps model names to prices. It is immutable, so it is safe
// for concurrent use; [PriceTable.Merge] returns a new table. The zero
// value and a nil *PriceTable are empty tables.
type PriceTable struct {
	exact  map[string]Price
	byLen  []string // names, longest first, for prefix matching
	source map[string]Price
}

// NewPriceTable returns a table of the given prices. Model names are
// matched case-insensitively. The map is copied.
func NewPriceTable(prices map[string]Price) *PriceTable {
	t := &PriceTable{exact: make(map[string]Price, len(prices)), source: make(map[string]Price, len(prices))}
	for name, p := range prices {
		n := strings.ToLower(strings.TrimSpace(name))
		if n == "" {
			continue
		}
		t.exact[n] = p
		t.source[name] = p
	}
	t.byLen = make([]string, 0, len(t.exact))
	for n := range t.exact {
		t.byLen = append(t.byLen, n)
	}
	sort.Slice(t.byLen, func(i, j int) bool {
		if len(t.byLen[i]) != len(t.byLen[j]) {
			return len(t.byLen[i]) > len(t.byLen[j])
		}
		return t.byLen[i] < t.byLen[j]
	})
	return t
}

// Merge returns a new table with the entries of t replaced or added by
// overrides (whole entries: an override does not inherit fields from the
// entry it replaces). t is unchanged. Use it for per-service prices:
// DefaultPrices().Merge(service.Prices).
func (t *PriceTable) Merge(overrides map[string]Price) *PriceTable {
	m := t.Prices()
	for name, p := range overrides {
		for old := range m {
			if strings.EqualFold(old, name) {
				delete(m, old)
			}
		}
		m[name] = p
	}
	return NewPriceTable(m)
}

// Prices returns a copy of the table's entries.
func (t *PriceTable) Prices() map[string]Price {
	if t == nil {
		return map[string]Price{}
	}
	m := make(map[string]Price, len(t.source))
	for k, v := range t.source {
		m[k] = v
	}
	return m
}

// Len returns the number of models in the table.
func (t *PriceTable) Len() int {
	if t == nil {
		return 0
	}
	return len(t.exact)
}

// Lookup returns the price of model. It tries, in order: the exact name
// (case-insensitive); the longest table name that is a prefix of model
// followed by '-', '@' or ':', so that dated snapshots and aliases
// find their base model ("gpt-4o-2024-08-06" → "gpt-4o",
// "claude-sonnet-4-20250514" → "claude-sonnet-4", while
// "gpt-4o-mini-2024-07-18" → "gpt-4o-mini"); and the same two after
// dropping a "models/" or vendor prefix ("openai/gpt-4o" → "gpt-4o").
func (t *PriceTable) Lookup(model string) (Price, bool) {
	if t == nil || len(t.exact) == 0 || model == "" {
		return Price{}, false
	}
	m := strings.TrimSpace(model)
	if hasUpper(m) {
		m = strings.ToLower(m)
	}
	m = strings.TrimPrefix(m, "models/")
	if p, ok := t.match(m); ok {
		return p, true
	}
	if i := strings.LastIndexByte(m, '/'); i >= 0 && i+1 < len(m) {
		return t.match(m[i+1:])
	}
	return Price{}, false
}

func (t *PriceTable) match(m string) (Price, bool) {
	if p, ok := t.exact[m]; ok {
		return p, true
	}
	for _, name := range t.byLen {
		if len(name) >= len(m) {
			continue
		}
		if strings.HasPrefix(m, name) {
			switch m[len(name)] {
			case '-', '@', ':':
				return t.exact[name], true
			}
		}
	}
	return Price{}, false
}

func hasUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			return true
		}
	}
	return false
}

// Cost returns the cost of u at the price of u.Model, and whether the
// model has a price.
func (t *PriceTable) Cost(u Usage) (float64, bool) {
	p, ok := t.Lookup(u.Model)
	if !ok {
		return 0, false
	}
	return Cost(u, p), true
}

//go:embed prices.yaml
var defaultPricesYAML []byte

var defaultPrices = sync.OnceValue(func() *PriceTable {
	m, err := ParsePrices(defaultPricesYAML)
	if err != nil {
		panic("meter: embedded prices.yaml: " + err.Error()) // caught by TestDefaultPrices
	}
	return NewPriceTable(m)
})

// DefaultPrices returns the table shipped with the package (prices.yaml):
// public list prices of current OpenAI, Anthropic, Gemini and Groq models
// as of its stated date. They change; override them per service with
// [PriceTable.Merge].
func DefaultPrices() *PriceTable { return defaultPrices() }

// DefaultPricesYAML returns the shipped price file, as a starting point
// for an operator's own.
func DefaultPricesYAML() []byte { return bytes.Clone(defaultPricesYAML) }

// ParsePrices decodes prices from YAML or JSON, either a document with a
// "models" map (the shape of prices.yaml) or a bare map of model name to
// [Price]. Unknown fields and negative prices are errors.
func ParsePrices(data []byte) (map[string]Price, error) {
	var doc struct {
		Models map[string]Price `yaml:"models"`
	}
	var probe map[string]yaml.Node
	if err := yaml.Unmarshal(data, &probe); err != nil {
		return nil, fmt.Errorf("meter: prices: %w", err)
	}
	var out map[string]Price
	if _, ok := probe["models"]; ok {
		if err := strictYAML(data, &doc); err != nil {
			return nil, err
		}
		out = doc.Models
	} else if err := strictYAML(data, &out); err != nil {
		return nil, err
	}
	if out == nil {
		out = map[string]Price{}
	}
	for name, p := range out {
		if err := p.validate(); err != nil {
			return nil, fmt.Errorf("meter: prices: %s: %w", name, err)
		}
	}
	return out, nil
}

func strictYAML(data []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("meter: prices: %w", err)
	}
	return nil
}

// LoadPriceFile reads prices from a YAML or JSON file in the format of
// [ParsePrices], and also reads model files of other gateways: a model's
// cost_per_million_tokens: {input, output} stands for its input and
// output prices, and keys a price has no field for (structure, module,
// …) are ignored and returned as ignored ("model.key", sorted), for the
// caller to warn about once.
func LoadPriceFile(path string) (prices map[string]Price, ignored []string, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("meter: %w", err)
	}
	return parseModelFile(data)
}

// modelEntry is one model of a model file: a [Price] and the keys of
// other gateways' model files.
type modelEntry struct {
	Price `yaml:",inline"`
	// CostPerMillionTokens is the input and output price (USD per million
	// tokens), as other gateways' model files write them.
	CostPerMillionTokens *struct {
		Input  float64 `yaml:"input"`
		Output float64 `yaml:"output"`
	} `yaml:"cost_per_million_tokens"`
}

// modelKeys are the keys a model entry understands.
var modelKeys = map[string]bool{
	"input": true, "output": true, "cached_input": true, "cache_write": true, "per_image": true,
	"per_character": true, "per_request": true, "description": true, "cost_per_million_tokens": true,
}

// parseModelFile decodes a price or model file leniently (see
// [LoadPriceFile]).
func parseModelFile(data []byte) (map[string]Price, []string, error) {
	var probe map[string]yaml.Node
	if err := yaml.Unmarshal(data, &probe); err != nil {
		return nil, nil, fmt.Errorf("meter: prices: %w", err)
	}
	var raw map[string]yaml.Node
	if n, ok := probe["models"]; ok {
		if err := n.Decode(&raw); err != nil {
			return nil, nil, fmt.Errorf("meter: prices: models: %w", err)
		}
	} else if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, nil, fmt.Errorf("meter: prices: %w", err)
	}
	out := make(map[string]Price, len(raw))
	var ignored []string
	for name, n := range raw {
		var keys map[string]yaml.Node
		if err := n.Decode(&keys); err != nil {
			return nil, nil, fmt.Errorf("meter: prices: %s: %w", name, err)
		}
		for k := range keys {
			if !modelKeys[k] {
				ignored = append(ignored, name+"."+k)
			}
		}
		var e modelEntry
		if err := n.Decode(&e); err != nil {
			return nil, nil, fmt.Errorf("meter: prices: %s: %w", name, err)
		}
		p := e.Price
		if c := e.CostPerMillionTokens; c != nil {
			if _, ok := keys["input"]; !ok {
				p.Input = c.Input
			}
			if _, ok := keys["output"]; !ok {
				p.Output = c.Output
			}
		}
		if err := p.validate(); err != nil {
			return nil, nil, fmt.Errorf("meter: prices: %s: %w", name, err)
		}
		out[name] = p
	}
	sort.Strings(ignored)
	return out, ignored, nil
}
