package admin

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"unicode/utf8"

	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

// opt is an optional JSON field: Set reports whether the field was present,
// Null whether it was null. A struct of opts serves both POST (required
// fields checked by hand) and PATCH (only present fields change).
type opt[T any] struct {
	Set  bool
	Null bool
	V    T
}

// UnmarshalJSON records presence and decodes the value.
func (o *opt[T]) UnmarshalJSON(b []byte) error {
	o.Set = true
	if string(b) == "null" {
		o.Null = true
		return nil
	}
	return json.Unmarshal(b, &o.V)
}

// has reports whether the field holds a value (present and not null).
func (o opt[T]) has() bool { return o.Set && !o.Null }

// decode reads a JSON object body into dst (strict; 1 MiB).
func decode(w http.ResponseWriter, r *http.Request, dst any) error {
	err := httpx.DecodeJSON(w, r, dst, MaxBody)
	// A body that is not an object reads as `field "(body)" must be
	// admin.keyInput, not array`: say what was expected instead.
	var he *httpx.Error
	if errors.As(err, &he) {
		if rest, ok := strings.CutPrefix(he.Message, `field "(body)" must be `); ok {
			if i := strings.LastIndex(rest, ", not "); i >= 0 {
				he.Message = "expected a JSON object, not " + withArticle(rest[i+len(", not "):])
			}
		}
	}
	return err
}

// errNotObject is the message of decode for a JSON array body.
const errNotObject = "expected a JSON object, not an array"

// withArticle returns "an array", "a string", ….
func withArticle(kind string) string {
	if kind != "" && strings.ContainsRune("aeiou", rune(kind[0])) {
		return "an " + kind
	}
	return "a " + kind
}

// limitsInput is the limit fields shared by services, teams and tokens.
type limitsInput struct {
	RPMLimit        opt[int]   `json:"rpm_limit"`
	TPMLimit        opt[int64] `json:"tpm_limit"`
	DailyTokenLimit opt[int64] `json:"daily_token_limit"`

	LimitCostHourWarn   opt[float64] `json:"limit_cost_hour_warn"`
	LimitCostHourBlock  opt[float64] `json:"limit_cost_hour_block"`
	LimitCostDayWarn    opt[float64] `json:"limit_cost_day_warn"`
	LimitCostDayBlock   opt[float64] `json:"limit_cost_day_block"`
	LimitCostMonthWarn  opt[float64] `json:"limit_cost_month_warn"`
	LimitCostMonthBlock opt[float64] `json:"limit_cost_month_block"`
	LimitCostTotalBlock opt[float64] `json:"limit_cost_total_block"`

	LimitTokensHourWarn   opt[int64] `json:"limit_tokens_hour_warn"`
	LimitTokensHourBlock  opt[int64] `json:"limit_tokens_hour_block"`
	LimitTokensDayWarn    opt[int64] `json:"limit_tokens_day_warn"`
	LimitTokensDayBlock   opt[int64] `json:"limit_tokens_day_block"`
	LimitTokensMonthWarn  opt[int64] `json:"limit_tokens_month_warn"`
	LimitTokensMonthBlock opt[int64] `json:"limit_tokens_month_block"`
	LimitTokensTotalBlock opt[int64] `json:"limit_tokens_total_block"`

	ModelsEnabled opt[[]string] `json:"models_enabled"`
}

// apply validates the present fields and copies them into l.
func (in *limitsInput) apply(l *store.Limits) error {
	ints := []struct {
		name string
		v    opt[int]
		dst  *int
	}{{"rpm_limit", in.RPMLimit, &l.RPMLimit}}
	for _, f := range ints {
		if f.v.has() {
			if f.v.V < 0 {
				return badRequest("%s must not be negative (0 means no limit)", f.name)
			}
			*f.dst = f.v.V
		}
	}
	int64s := []struct {
		name string
		v    opt[int64]
		dst  *int64
	}{
		{"tpm_limit", in.TPMLimit, &l.TPMLimit},
		{"daily_token_limit", in.DailyTokenLimit, &l.DailyTokenLimit},
		{"limit_tokens_hour_warn", in.LimitTokensHourWarn, &l.LimitTokensHourWarn},
		{"limit_tokens_hour_block", in.LimitTokensHourBlock, &l.LimitTokensHourBlock},
		{"limit_tokens_day_warn", in.LimitTokensDayWarn, &l.LimitTokensDayWarn},
		{"limit_tokens_day_block", in.LimitTokensDayBlock, &l.LimitTokensDayBlock},
		{"limit_tokens_month_warn", in.LimitTokensMonthWarn, &l.LimitTokensMonthWarn},
		{"limit_tokens_month_block", in.LimitTokensMonthBlock, &l.LimitTokensMonthBlock},
		{"limit_tokens_total_block", in.LimitTokensTotalBlock, &l.LimitTokensTotalBlock},
	}
	for _, f := range int64s {
		if f.v.has() {
			if f.v.V < 0 {
				return badRequest("%s must not be negative (0 means no limit)", f.name)
			}
			*f.dst = f.v.V
		}
	}
	floats := []struct {
		name string
		v    opt[float64]
		dst  *float64
	}{
		{"limit_cost_hour_warn", in.LimitCostHourWarn, &l.LimitCostHourWarn},
		{"limit_cost_hour_block", in.LimitCostHourBlock, &l.LimitCostHourBlock},
		{"limit_cost_day_warn", in.LimitCostDayWarn, &l.LimitCostDayWarn},
		{"limit_cost_day_block", in.LimitCostDayBlock, &l.LimitCostDayBlock},
		{"limit_cost_month_warn", in.LimitCostMonthWarn, &l.LimitCostMonthWarn},
		{"limit_cost_month_block", in.LimitCostMonthBlock, &l.LimitCostMonthBlock},
		{"limit_cost_total_block", in.LimitCostTotalBlock, &l.LimitCostTotalBlock},
	}
	for _, f := range floats {
		if f.v.has() {
			if f.v.V < 0 {
				return badRequest("%s must not be negative (0 means no limit)", f.name)
			}
			*f.dst = f.v.V
		}
	}
	if in.ModelsEnabled.Set {
		ms, err := cleanList("models_enabled", in.ModelsEnabled.V, 256, 1000)
		if err != nil {
			return err
		}
		l.ModelsEnabled = ms
	}
	return nil
}

// cleanList trims a list of names, rejecting empty, overlong, control
// characters and too many entries, and dropping duplicates. Nil for empty.
func cleanList(field string, in []string, maxLen, maxN int) ([]string, error) {
	if len(in) > maxN {
		return nil, badRequest("%s has %d entries; at most %d", field, len(in), maxN)
	}
	var out []string
	seen := map[string]bool{}
	for i, v := range in {
		v = strings.TrimSpace(v)
		if err := checkText(fmt.Sprintf("%s[%d]", field, i), v, maxLen, true); err != nil {
			return nil, err
		}
		if !seen[v] {
			seen[v] = true
			out = append(out, v)
		}
	}
	return out, nil
}

// checkText rejects text that is too long, not UTF-8, holds control
// characters or, when required, is empty.
func checkText(field, v string, maxLen int, required bool) error {
	switch {
	case required && v == "":
		return badRequest("%s is required and must not be empty", field)
	case len(v) > maxLen:
		return badRequest("%s is longer than %d bytes", field, maxLen)
	case !utf8.ValidString(v):
		return badRequest("%s is not valid UTF-8", field)
	}
	for _, c := range v {
		if c < 0x20 || c == 0x7f {
			return badRequest("%s must not contain control characters", field)
		}
	}
	return nil
}

// isName reports whether v matches [a-z0-9][a-z0-9._-]{0,63}: service
// names, which appear in URLs.
func isName(v string) bool {
	if v == "" || len(v) > 64 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// checkLabels validates a key's labels.
func checkLabels(labels map[string]string) error {
	if len(labels) > 64 {
		return badRequest("labels has %d entries; at most 64", len(labels))
	}
	for k, v := range labels {
		if err := checkText("labels key", k, 64, true); err != nil {
			return err
		}
		if err := checkText(fmt.Sprintf("labels[%q]", k), v, 256, false); err != nil {
			return err
		}
	}
	return nil
}
