package external

import (
	"encoding/json"
	"fmt"
	"maps"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Defaults applied by [Open] to a zero [Config].
const (
	DefaultTable        = "credentials"
	DefaultActiveStatus = "active"
	DefaultRefresh      = 30 * time.Second
)

// Absent is the column name that marks an optional column as missing from
// the external table: its field is left zero on every key. Only Email,
// QuotaTotal, QuotaUsed, QuotaUnit, ExtraMetadata, CreatedAt and UpdatedAt
// may be absent.
const Absent = "-"

// Config describes the external credential table. The zero value reads the
// registration bot's schema (see [Columns]) with rows whose status is
// "active", re-read every 30 seconds, and every keypool service name mapped
// to the same external name.
//
// Table and column names are interpolated into SQL, so [Open] accepts only
// identifiers matching [A-Za-z_][A-Za-z0-9_]* (the table may be qualified
// by a schema, "schema.table") and quotes them. Quoted names are matched
// case-sensitively: on PostgreSQL write them as the catalog holds them
// (lower case unless the table was created with quoted names).
type Config struct {
	// Table is the credential table, optionally schema-qualified. If
	// empty, "credentials".
	Table string `json:"table,omitempty" yaml:"table,omitempty"`
	// Columns renames columns; an empty field keeps the default name.
	Columns Columns `json:"columns,omitzero" yaml:"columns,omitempty"`
	// ActiveStatus is the status value of usable rows; rows with any
	// other status (expired, suspended, ...) are left out. Compared
	// exactly. If empty, "active".
	ActiveStatus string `json:"active_status,omitempty" yaml:"active_status,omitempty"`
	// Refresh is how long rows read from the table are served from
	// memory before being read again: no key returned by [Source.Keys]
	// was read longer ago than this. If zero, 30s. In JSON and YAML it is
	// a duration string ("30s", "1m") or a number of seconds.
	Refresh Duration `json:"refresh,omitempty" yaml:"refresh,omitempty"`
	// Services maps a keypool service name to the service name used in
	// the external table, e.g. {"exa": "exaai"}. A keypool name that is
	// not listed maps to itself. Several keypool names may map to the
	// same external name; each then gets the same rows.
	Services map[string]string `json:"services,omitempty" yaml:"services,omitempty"`
}

// Columns names the columns of the external table. An empty field means
// the default name, shown in each field's tag; [Absent] ("-") marks an
// optional column the table does not have.
type Columns struct {
	// ID is the row's stable identifier (integer or text). Key ids are
	// "ext_" followed by it.
	ID string `json:"id,omitempty" yaml:"id,omitempty"`
	// Service holds the external service name ("exaai", "groq", ...).
	Service string `json:"service,omitempty" yaml:"service,omitempty"`
	// APIKey holds the credential itself.
	APIKey string `json:"api_key,omitempty" yaml:"api_key,omitempty"`
	// Email is the account's email address.
	Email string `json:"email,omitempty" yaml:"email,omitempty"`
	// QuotaTotal and QuotaUsed are numbers, in QuotaUnit.
	QuotaTotal string `json:"quota_total,omitempty" yaml:"quota_total,omitempty"`
	QuotaUsed  string `json:"quota_used,omitempty" yaml:"quota_used,omitempty"`
	QuotaUnit  string `json:"quota_unit,omitempty" yaml:"quota_unit,omitempty"`
	// Status is compared with [Config.ActiveStatus].
	Status string `json:"status,omitempty" yaml:"status,omitempty"`
	// ExtraMetadata holds a JSON object whose string values become the
	// key's labels.
	ExtraMetadata string `json:"extra_metadata,omitempty" yaml:"extra_metadata,omitempty"`
	// CreatedAt and UpdatedAt are timestamps (native, text or Unix
	// seconds); UpdatedAt also feeds [Source.Version].
	CreatedAt string `json:"created_at,omitempty" yaml:"created_at,omitempty"`
	UpdatedAt string `json:"updated_at,omitempty" yaml:"updated_at,omitempty"`
}

// column is one resolved column: its default name (used in messages) and
// its quoted SQL name, or "" when absent.
type column struct {
	name   string
	quoted string
}

// resolved column set, in select order.
type columnSet struct {
	id, service, apiKey, email, quotaTotal, quotaUsed, quotaUnit, status, extra, createdAt, updatedAt column
}

// Duration is a [time.Duration] that decodes from JSON and YAML as a
// duration string ("30s", "1m30s") or a bare number of seconds, and
// encodes as a duration string.
type Duration time.Duration

// String returns the duration in [time.Duration.String] form.
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalText encodes the duration as a string such as "30s".
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText decodes a duration string, or a bare integer as seconds.
func (d *Duration) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	if s == "" {
		*d = 0
		return nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		*d = Duration(time.Duration(n) * time.Second)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%w: refresh %q: %w", ErrInvalidConfig, s, err)
	}
	*d = Duration(v)
	return nil
}

// UnmarshalJSON decodes a JSON string (see [Duration.UnmarshalText]) or a
// JSON number of seconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	switch v := v.(type) {
	case nil:
		return nil
	case string:
		return d.UnmarshalText([]byte(v))
	case float64:
		*d = Duration(v * float64(time.Second))
		return nil
	default:
		return fmt.Errorf("%w: refresh must be a duration string or seconds", ErrInvalidConfig)
	}
}

// UnmarshalYAML decodes a YAML scalar the way [Duration.UnmarshalJSON]
// does. It uses the callback form that gopkg.in/yaml.v3 and
// go.yaml.in/yaml/v4 both honor, so this package imports neither.
func (d *Duration) UnmarshalYAML(unmarshal func(any) error) error {
	var v any
	if err := unmarshal(&v); err != nil {
		return err
	}
	switch v := v.(type) {
	case nil:
		return nil
	case string:
		return d.UnmarshalText([]byte(v))
	case int:
		*d = Duration(time.Duration(v) * time.Second)
	case int64:
		*d = Duration(time.Duration(v) * time.Second)
	case uint64:
		*d = Duration(time.Duration(v) * time.Second)
	case float64:
		*d = Duration(v * float64(time.Second))
	default:
		return fmt.Errorf("%w: refresh must be a duration string or seconds", ErrInvalidConfig)
	}
	return nil
}

var identRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// quoteIdent validates a bare identifier and returns it double-quoted.
func quoteIdent(s string) (string, bool) {
	if !identRE.MatchString(s) {
		return "", false
	}
	return `"` + s + `"`, true
}

// quoteTable validates a table name, optionally "schema.table", and
// returns it quoted.
func quoteTable(s string) (string, bool) {
	parts := strings.Split(s, ".")
	if len(parts) > 2 {
		return "", false
	}
	for i, p := range parts {
		q, ok := quoteIdent(p)
		if !ok {
			return "", false
		}
		parts[i] = q
	}
	return strings.Join(parts, "."), true
}

// normalized is a validated copy of a Config.
type normalized struct {
	cfg     Config
	table   string // quoted
	cols    columnSet
	refresh time.Duration
}

// normalize copies cfg, applies defaults and validates it.
func (cfg Config) normalize() (normalized, error) {
	var n normalized
	if cfg.Table == "" {
		cfg.Table = DefaultTable
	}
	if cfg.ActiveStatus == "" {
		cfg.ActiveStatus = DefaultActiveStatus
	}
	if cfg.Refresh < 0 {
		return n, fmt.Errorf("%w: refresh %s is negative", ErrInvalidConfig, cfg.Refresh)
	}
	if cfg.Refresh == 0 {
		cfg.Refresh = Duration(DefaultRefresh)
	}
	cfg.Services = maps.Clone(cfg.Services)
	if err := checkServices(cfg.Services); err != nil {
		return n, err
	}
	t, ok := quoteTable(cfg.Table)
	if !ok {
		return n, fmt.Errorf("%w: table name %q is not an identifier", ErrInvalidConfig, cfg.Table)
	}
	c := cfg.Columns
	var errs []string
	col := func(field, def string, optional bool) column {
		name := field
		if name == "" {
			name = def
		}
		if name == Absent {
			if !optional {
				errs = append(errs, fmt.Sprintf("column %s is required", def))
			}
			return column{name: def}
		}
		q, ok := quoteIdent(name)
		if !ok {
			errs = append(errs, fmt.Sprintf("column %s: %q is not an identifier", def, name))
		}
		return column{name: def, quoted: q}
	}
	n.cols = columnSet{
		id:         col(c.ID, "id", false),
		service:    col(c.Service, "service", false),
		apiKey:     col(c.APIKey, "api_key", false),
		email:      col(c.Email, "email", true),
		quotaTotal: col(c.QuotaTotal, "quota_total", true),
		quotaUsed:  col(c.QuotaUsed, "quota_used", true),
		quotaUnit:  col(c.QuotaUnit, "quota_unit", true),
		status:     col(c.Status, "status", false),
		extra:      col(c.ExtraMetadata, "extra_metadata", true),
		createdAt:  col(c.CreatedAt, "created_at", true),
		updatedAt:  col(c.UpdatedAt, "updated_at", true),
	}
	if len(errs) > 0 {
		return n, fmt.Errorf("%w: %s", ErrInvalidConfig, strings.Join(errs, "; "))
	}
	n.cfg, n.table, n.refresh = cfg, t, time.Duration(cfg.Refresh)
	return n, nil
}

func checkServices(m map[string]string) error {
	for k, v := range m {
		if strings.TrimSpace(k) == "" || strings.TrimSpace(v) == "" {
			return fmt.Errorf("%w: services: empty name in mapping %q → %q", ErrInvalidConfig, k, v)
		}
	}
	return nil
}
