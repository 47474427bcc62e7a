package console

import (
	"encoding/json"
	"fmt"
	"html/template"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// fieldKind says how a form field becomes JSON.
type fieldKind int

const (
	text     fieldKind = iota // a string
	number                    // a JSON number; anything else is sent as a string for the API to reject
	list                      // comma- or line-separated list of strings
	headers                   // "Name: value" lines, an object
	rawJSON                   // a JSON document, sent as is when it parses
	boolean                   // a checkbox: a hidden "false" before a checkbox "true"
	duration                  // a duration ("30s") or seconds; empty clears it (null)
)

// field is one form field of an admin API body.
type field struct {
	Name  string // the form and JSON name
	Label string
	Kind  fieldKind
	Help  string
}

// limitFields are the limits and budgets of services, teams and tokens.
var limitFields = []field{
	{"rpm_limit", "Requests per minute", number, "for all clients together; 0 = no limit"},
	{"tpm_limit", "Tokens per minute", number, ""},
	{"daily_token_limit", "Tokens per day", number, ""},
	{"limit_cost_hour_warn", "Cost per hour, warn (USD)", number, ""},
	{"limit_cost_hour_block", "Cost per hour, block (USD)", number, ""},
	{"limit_cost_day_warn", "Cost per day, warn (USD)", number, ""},
	{"limit_cost_day_block", "Cost per day, block (USD)", number, ""},
	{"limit_cost_month_warn", "Cost per month, warn (USD)", number, ""},
	{"limit_cost_month_block", "Cost per month, block (USD)", number, ""},
	{"limit_cost_total_block", "Total cost, block (USD)", number, ""},
	{"limit_tokens_hour_warn", "Tokens per hour, warn", number, ""},
	{"limit_tokens_hour_block", "Tokens per hour, block", number, ""},
	{"limit_tokens_day_warn", "Tokens per day, warn", number, ""},
	{"limit_tokens_day_block", "Tokens per day, block", number, ""},
	{"limit_tokens_month_warn", "Tokens per month, warn", number, ""},
	{"limit_tokens_month_block", "Tokens per month, block", number, ""},
	{"limit_tokens_total_block", "Total tokens, block", number, ""},
	{"models_enabled", "Models enabled", list, "comma-separated; empty = all models"},
}

// serviceFields are the service form's fields besides its name.
var serviceFields = []field{
	{"display_name", "Display name", text, ""},
	{"description", "Description", text, ""},
	{"is_active", "Active", boolean, "off: the proxy refuses the service's requests"},
	{"base_url", "Base URL", text, "e.g. https://api.openai.com"},
	{"auth_scheme", "Auth scheme", text, "bearer, x-api-key, xi-api-key, authorization-raw, authorization-token, query-param, header:Name, query:name"},
	{"selector", "Selector", text, "round_robin, weighted, random, least_in_flight, least_used, latency, sticky, ordered"},
	{"rate_limit_rpm", "Upstream requests per minute per key", number, "what the upstream allows each key"},
	{"max_in_flight", "Max in flight per key", number, ""},
	{"external_name", "External name", text, "the service's name in an external credential table"},
	{"llm_family", "LLM family", text, "openai, anthropic, gemini or none; empty = detect"},
	{"proxy_headers", "Headers sent upstream", headers, "one per line, Name: value"},
	{"prices", "Prices (JSON)", rawJSON, `model → price, e.g. {"my-model":{"input":1,"output":2}}`},
	{"kind", "Kind", text, "empty for an upstream API; router for a model router (no base URL, no keys), set at creation"},
	{"routes", "Routes (JSON, routers only)", rawJSON, `e.g. [{"model":"claude-*","targets":[{"service":"anthropic","path":"/v1"}]}]`},
	{"router", "Router settings (JSON, routers only)", rawJSON, `attempt budget and breakers, e.g. {"max_attempts":2,"breaker_failures":5,"breaker_open_seconds":30,"breaker_max_open_seconds":600}; empty = defaults`},
}

// policyFields are a service's upstream timeouts and key policy.
var policyFields = []field{
	{"header_timeout", "Response header timeout", duration, "per attempt, e.g. 30s; empty = the server's default"},
	{"idle_timeout", "Idle timeout", duration, "between reads of a response body; empty = the server's default"},
	{"request_timeout", "Request timeout", duration, "all attempts together; empty = the server's default"},
	{"retry_after_cap", "Retry-After cap (seconds)", number, "longest cooldown a 429 imposes; 0 = 3600"},
	{"confirm_refusals", "Refusals that make a key invalid", number, "bare 403s another key served; 0 = 3"},
	{"min_active_keys", "Minimum keys in rotation", number, "0 = half the keys"},
	{"max_ejection_percent", "Max ejection percent", number, "largest share of keys the breaker ejects; 0 = 50"},
	{"classifier", "Classifier", text, "a registered classifier's name; empty = the built-in rules"},
}

// keyFields are the "add a key" form's fields besides its value.
var keyFields = []field{
	{"balance_total", "Balance", number, ""},
	{"balance_unit", "Balance unit", text, "usd, tokens, requests, credits"},
	{"account_email", "Account email", text, ""},
	{"weight", "Weight", number, ""},
	{"rate_limit_rpm", "Requests per minute (this key)", number, "0 = the service's"},
	{"tier", "Tier", text, "the tier the key joins (see Tiers); empty = none"},
}

// body turns the posted form into an admin API body. On create, empty
// fields are left out; on update (patch), an empty field clears its value.
func body(r *http.Request, fields []field, patch bool) map[string]any {
	out := map[string]any{}
	for _, f := range fields {
		v := strings.TrimSpace(r.PostFormValue(f.Name))
		if _, present := r.PostForm[f.Name]; !present {
			continue
		}
		if v == "" && !patch && f.Kind != boolean {
			continue
		}
		switch f.Kind {
		case boolean:
			out[f.Name] = false
			for _, x := range r.PostForm[f.Name] {
				if x == "true" {
					out[f.Name] = true
				}
			}
		case duration:
			if v == "" {
				out[f.Name] = json.RawMessage("null")
			} else if _, err := strconv.ParseFloat(v, 64); err == nil {
				out[f.Name] = json.Number(v)
			} else {
				out[f.Name] = v
			}
		case text:
			out[f.Name] = v
		case number:
			if v == "" {
				out[f.Name] = 0
			} else if json.Valid([]byte(v)) && strings.Trim(v, "-0123456789.eE+") == "" {
				out[f.Name] = json.Number(v)
			} else {
				out[f.Name] = v // the API answers "must be a number"
			}
		case list:
			l := []string{}
			for _, p := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == '\n' }) {
				if p = strings.TrimSpace(p); p != "" {
					l = append(l, p)
				}
			}
			out[f.Name] = l
		case headers:
			m := map[string]string{}
			for _, line := range strings.Split(v, "\n") {
				if line = strings.TrimSpace(line); line == "" {
					continue
				}
				k, val, _ := strings.Cut(line, ":")
				m[strings.TrimSpace(k)] = strings.TrimSpace(val)
			}
			out[f.Name] = m
		case rawJSON:
			if v == "" {
				out[f.Name] = json.RawMessage("null")
			} else if json.Valid([]byte(v)) {
				out[f.Name] = json.RawMessage(v)
			} else {
				out[f.Name] = v
			}
		}
	}
	return out
}

// values renders a record's fields for a form: m is the record as JSON.
func values(m map[string]any, fields []field) map[string]string {
	out := map[string]string{}
	for _, f := range fields {
		v, ok := m[f.Name]
		if !ok || v == nil {
			continue
		}
		switch f.Kind {
		case list:
			var parts []string
			if l, ok := v.([]any); ok {
				for _, x := range l {
					parts = append(parts, fmt.Sprint(x))
				}
			}
			out[f.Name] = strings.Join(parts, ", ")
		case headers:
			var lines []string
			if hm, ok := v.(map[string]any); ok {
				for k, x := range hm {
					lines = append(lines, k+": "+fmt.Sprint(x))
				}
			}
			out[f.Name] = strings.Join(lines, "\n")
		case rawJSON:
			if s, ok := v.(string); ok {
				out[f.Name] = s
			} else {
				b, _ := json.Marshal(v)
				out[f.Name] = string(b)
			}
		case boolean:
			out[f.Name] = strconv.FormatBool(v == true)
		case number:
			if n, ok := v.(float64); ok && n != 0 {
				out[f.Name] = strconv.FormatFloat(n, 'f', -1, 64)
			}
		default:
			out[f.Name] = fmt.Sprint(v)
		}
	}
	return out
}

// formValues keeps what the user typed, to show the form again after an
// error.
func formValues(r *http.Request) map[string]string {
	out := map[string]string{}
	for k, v := range r.PostForm {
		if len(v) > 0 && k != "key_value" && k != "keys" && k != "password" {
			out[k] = v[len(v)-1] // a checked checkbox follows its hidden "false"
		}
	}
	return out
}

// form is a form's fields with their current values.
type form struct {
	// Prefix keeps the ids of its inputs unique on a page.
	Prefix string
	Fields []field
	Values map[string]string
}

var funcs = template.FuncMap{
	"isList":   func(f field) bool { return f.Kind == list || f.Kind == headers || f.Kind == rawJSON },
	"isNumber": func(f field) bool { return f.Kind == number },
	"isBool":   func(f field) bool { return f.Kind == boolean },
	"rfc3339":  func(t time.Time) string { return t.UTC().Format(time.RFC3339) },
	"when":     when,
	"whenPtr": func(t *time.Time) string {
		if t == nil {
			return "never"
		}
		return when(*t)
	},
	"num":   num,
	"money": func(v float64) string { return fmt.Sprintf("$%.4f", v) },
	"pct": func(a, b float64) int {
		if b <= 0 {
			return 0
		}
		return int(math.Min(100, math.Round(100*a/b)))
	},
	"stateLabel": func(s string) string {
		if s == "open" {
			return "open (breaker)"
		}
		return s
	},
	"until":  untilText,
	"lookup": func(m map[string]string, k string) string { return m[k] },
	"json": func(v any) string {
		b, _ := json.MarshalIndent(v, "", "  ")
		return string(b)
	},
	"add": func(a, b int) int { return a + b },
	"seq": func(n int) []int {
		s := make([]int, n)
		for i := range s {
			s[i] = i
		}
		return s
	},
	"float": func(v any) float64 { f, _ := v.(float64); return f },
	"ts": func(v any) string {
		str, _ := v.(string)
		if t, err := time.Parse(time.RFC3339Nano, str); err == nil {
			return when(t)
		}
		return str
	},
	"dict2": func(p string, f field, v map[string]string) fieldView { return fieldView{p, f, v} },
}

// fieldView is a field and the form's values, for the "field" template.
type fieldView struct {
	P string
	F field
	V map[string]string
}

// when formats a time for a table.
func when(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format("2006-01-02 15:04:05 UTC")
}

// untilText is the countdown text for a time (the page's script keeps it
// going).
func untilText(t *time.Time) string {
	if t == nil {
		return ""
	}
	d := time.Until(*t).Round(time.Second)
	if d <= 0 {
		return "now"
	}
	return d.String()
}

// num formats a count with thousands separators.
func num(v any) string {
	var n int64
	switch x := v.(type) {
	case int:
		n = int64(x)
	case int64:
		n = x
	case float64:
		n = int64(x)
	}
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	if neg {
		s = "-" + s
	}
	return s
}
