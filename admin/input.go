package admin

import (
	"encoding/json"
	"errors"
	"net/http"
	"strings"

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

// field pairs an optional input field with the record field it sets.
type field[T any] struct {
	in  opt[T]
	dst *T
}

// setPresent copies every present field into its destination (null: the
// zero value).
func setPresent[T any](fs ...field[T]) {
	for _, f := range fs {
		if f.in.Set {
			*f.dst = f.in.V
		}
	}
}

// setValues copies every field that holds a value (null leaves the
// destination as it is).
func setValues[T any](fs ...field[T]) {
	for _, f := range fs {
		if f.in.has() {
			*f.dst = f.in.V
		}
	}
}

// set copies the present, non-null fields into l (models_enabled: null
// clears it).
func (in *limitsInput) set(l *store.Limits) {
	setValues(field[int]{in.RPMLimit, &l.RPMLimit})
	setValues(
		field[int64]{in.TPMLimit, &l.TPMLimit},
		field[int64]{in.DailyTokenLimit, &l.DailyTokenLimit},
		field[int64]{in.LimitTokensHourWarn, &l.LimitTokensHourWarn},
		field[int64]{in.LimitTokensHourBlock, &l.LimitTokensHourBlock},
		field[int64]{in.LimitTokensDayWarn, &l.LimitTokensDayWarn},
		field[int64]{in.LimitTokensDayBlock, &l.LimitTokensDayBlock},
		field[int64]{in.LimitTokensMonthWarn, &l.LimitTokensMonthWarn},
		field[int64]{in.LimitTokensMonthBlock, &l.LimitTokensMonthBlock},
		field[int64]{in.LimitTokensTotalBlock, &l.LimitTokensTotalBlock},
	)
	setValues(
		field[float64]{in.LimitCostHourWarn, &l.LimitCostHourWarn},
		field[float64]{in.LimitCostHourBlock, &l.LimitCostHourBlock},
		field[float64]{in.LimitCostDayWarn, &l.LimitCostDayWarn},
		field[float64]{in.LimitCostDayBlock, &l.LimitCostDayBlock},
		field[float64]{in.LimitCostMonthWarn, &l.LimitCostMonthWarn},
		field[float64]{in.LimitCostMonthBlock, &l.LimitCostMonthBlock},
		field[float64]{in.LimitCostTotalBlock, &l.LimitCostTotalBlock},
	)
	setPresent(field[[]string]{in.ModelsEnabled, &l.ModelsEnabled})
}

// apply copies the present fields into l and validates the result
// (store.Limits.Validate): the limits of teams and tokens.
func (in *limitsInput) apply(l *store.Limits) error {
	in.set(l)
	return invalid(l.Validate())
}

// cleanList is store.CleanList with the error as a 400.
func cleanList(field string, in []string, maxLen, maxN int) ([]string, error) {
	out, err := store.CleanList(field, in, maxLen, maxN)
	return out, invalid(err)
}

// checkText is store.CheckText with the error as a 400.
func checkText(field, v string, maxLen int, required bool) error {
	return invalid(store.CheckText(field, v, maxLen, required))
}

// setDescription validates a present description field and copies it
// into dst (null clears it).
func setDescription(in opt[string], dst *string) error {
	if !in.Set {
		return nil
	}
	v := strings.TrimSpace(in.V)
	if err := checkText("description", v, store.MaxDescription, false); err != nil {
		return err
	}
	*dst = v
	return nil
}
