package sqlstore

import (
	"encoding/json"
	"fmt"
	"reflect"
	"time"

	"github.com/keypool/keypool/store"
)

// Row types mirror the tables one to one; JSON-valued columns hold maps,
// lists and limits.

type serviceRow struct {
	Name         string    `gorm:"column:name;primaryKey"`
	DisplayName  string    `gorm:"column:display_name"`
	Description  string    `gorm:"column:description"`
	Kind         string    `gorm:"column:kind"`
	Routes       string    `gorm:"column:routes"`
	Router       string    `gorm:"column:router"`
	Disabled     bool      `gorm:"column:disabled"`
	BaseURL      string    `gorm:"column:base_url"`
	AuthScheme   string    `gorm:"column:auth_scheme"`
	RateLimitRPM int       `gorm:"column:rate_limit_rpm"`
	MaxInFlight  int       `gorm:"column:max_in_flight"`
	ProxyHeaders string    `gorm:"column:proxy_headers"`
	Selector     string    `gorm:"column:selector"`
	ExternalName string    `gorm:"column:external_name"`
	Prices       string    `gorm:"column:prices"`
	LLMFamily    string    `gorm:"column:llm_family"`
	HeaderMS     int64     `gorm:"column:header_timeout_ms"`
	IdleMS       int64     `gorm:"column:idle_timeout_ms"`
	RequestMS    int64     `gorm:"column:request_timeout_ms"`
	Limits       string    `gorm:"column:limits"`
	KeyPolicy    string    `gorm:"column:key_policy"`
	CreatedAt    time.Time `gorm:"column:created_at;autoCreateTime:false"`
	UpdatedAt    time.Time `gorm:"column:updated_at;autoUpdateTime:false"`
}

func (serviceRow) TableName() string { return "services" }

type keyRow struct {
	ID           string    `gorm:"column:id;primaryKey"`
	Service      string    `gorm:"column:service"`
	Ciphertext   []byte    `gorm:"column:ciphertext"`
	KeyVersion   int64     `gorm:"column:key_version"`
	Fingerprint  []byte    `gorm:"column:fingerprint"`
	Hint         string    `gorm:"column:hint"`
	Weight       int       `gorm:"column:weight"`
	Priority     int       `gorm:"column:priority"`
	RateLimitRPM int       `gorm:"column:rate_limit_rpm"`
	MaxInFlight  int       `gorm:"column:max_in_flight"`
	Labels       string    `gorm:"column:labels"`
	BalanceTotal float64   `gorm:"column:balance_total"`
	BalanceUsed  float64   `gorm:"column:balance_used"`
	BalanceUnit  string    `gorm:"column:balance_unit"`
	AccountEmail string    `gorm:"column:account_email"`
	Tier         string    `gorm:"column:tier"`
	Status       string    `gorm:"column:status"`
	StatusReason string    `gorm:"column:status_reason"`
	Origin       string    `gorm:"column:origin"`
	CreatedAt    time.Time `gorm:"column:created_at;autoCreateTime:false"`
	UpdatedAt    time.Time `gorm:"column:updated_at;autoUpdateTime:false"`
}

func (keyRow) TableName() string { return "keys" }

type teamRow struct {
	ID              string    `gorm:"column:id;primaryKey"`
	Name            string    `gorm:"column:name"`
	Description     string    `gorm:"column:description"`
	AllowedServices string    `gorm:"column:allowed_services"`
	Limits          string    `gorm:"column:limits"`
	CreatedAt       time.Time `gorm:"column:created_at;autoCreateTime:false"`
	UpdatedAt       time.Time `gorm:"column:updated_at;autoUpdateTime:false"`
}

func (teamRow) TableName() string { return "teams" }

type userRow struct {
	ID         string    `gorm:"column:id;primaryKey"`
	ExternalID string    `gorm:"column:external_id"`
	TeamID     string    `gorm:"column:team_id"`
	Disabled   bool      `gorm:"column:disabled"`
	CreatedAt  time.Time `gorm:"column:created_at;autoCreateTime:false"`
	UpdatedAt  time.Time `gorm:"column:updated_at;autoUpdateTime:false"`
}

func (userRow) TableName() string { return "users" }

type tokenRow struct {
	ID          string     `gorm:"column:id;primaryKey"`
	Name        string     `gorm:"column:name"`
	Description string     `gorm:"column:description"`
	TeamID      string     `gorm:"column:team_id"`
	UserID      *string    `gorm:"column:user_id"`
	Prefix      string     `gorm:"column:prefix"`
	Hash        []byte     `gorm:"column:hash"`
	Scopes      string     `gorm:"column:scopes"`
	ExpiresAt   *time.Time `gorm:"column:expires_at"`
	IsActive    bool       `gorm:"column:is_active"`
	Limits      string     `gorm:"column:limits"`
	LastUsedAt  *time.Time `gorm:"column:last_used_at"`
	CreatedAt   time.Time  `gorm:"column:created_at;autoCreateTime:false"`
	UpdatedAt   time.Time  `gorm:"column:updated_at;autoUpdateTime:false"`
}

func (tokenRow) TableName() string { return "tokens" }

// usageRow has no id field, so inserts need no RETURNING clause.
type usageRow struct {
	Ts           int64   `gorm:"column:ts"`
	RecordID     *string `gorm:"column:record_id"`
	RequestID    string  `gorm:"column:request_id"`
	TeamID       string  `gorm:"column:team_id"`
	TokenID      string  `gorm:"column:token_id"`
	Service      string  `gorm:"column:service"`
	Router       string  `gorm:"column:router"`
	KeyID        string  `gorm:"column:key_id"`
	Model        string  `gorm:"column:model"`
	Status       int     `gorm:"column:status"`
	TokensIn     int64   `gorm:"column:tokens_in"`
	TokensOut    int64   `gorm:"column:tokens_out"`
	CachedTokens int64   `gorm:"column:cached_tokens"`
	Cost         float64 `gorm:"column:cost"`
	LatencyMS    int64   `gorm:"column:latency_ms"`
}

func (usageRow) TableName() string { return "usage_records" }

// encodeJSON encodes v, or returns "" for an empty map or list.
func encodeJSON[T any](v T, empty bool) (string, error) {
	if empty {
		return "", nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("%w: encode: %w", store.ErrInvalid, err)
	}
	return string(b), nil
}

func decodeJSON(s string, v any) error {
	if s == "" {
		return nil
	}
	if err := json.Unmarshal([]byte(s), v); err != nil {
		return fmt.Errorf("decode stored JSON: %w", err)
	}
	return nil
}

func encodeLimits(l store.Limits) (string, error) {
	return encodeJSON(l, isZeroLimits(l))
}

func isZeroLimits(l store.Limits) bool {
	if len(l.ModelsEnabled) > 0 {
		return false
	}
	l.ModelsEnabled = nil
	return reflect.ValueOf(l).IsZero()
}

func serviceToRow(s *store.Service) (serviceRow, error) {
	r := serviceRow{
		Name: s.Name, DisplayName: s.DisplayName, Description: s.Description, Kind: s.Kind, Disabled: s.Disabled, BaseURL: s.BaseURL, AuthScheme: s.AuthScheme,
		RateLimitRPM: s.RateLimitRPM, MaxInFlight: s.MaxInFlight, Selector: s.Selector,
		ExternalName: s.ExternalName, Prices: s.Prices, LLMFamily: s.LLMFamily, CreatedAt: s.CreatedAt, UpdatedAt: s.UpdatedAt,
		HeaderMS: s.HeaderTimeout.Milliseconds(), IdleMS: s.IdleTimeout.Milliseconds(), RequestMS: s.RequestTimeout.Milliseconds(),
	}
	var err error
	if r.ProxyHeaders, err = encodeJSON(s.ProxyHeaders, len(s.ProxyHeaders) == 0); err != nil {
		return r, err
	}
	if r.Limits, err = encodeLimits(s.Limits); err != nil {
		return r, err
	}
	if r.KeyPolicy, err = encodeJSON(s.KeyPolicy, s.KeyPolicy == store.KeyPolicy{}); err != nil {
		return r, err
	}
	if r.Routes, err = encodeJSON(s.Routes, len(s.Routes) == 0); err != nil {
		return r, err
	}
	if r.Router, err = encodeJSON(s.Router, s.Router == nil); err != nil {
		return r, err
	}
	return r, nil
}

func serviceFromRow(r *serviceRow) (store.Service, error) {
	s := store.Service{
		Name: r.Name, DisplayName: r.DisplayName, Description: r.Description, Kind: r.Kind, Disabled: r.Disabled, BaseURL: r.BaseURL, AuthScheme: r.AuthScheme,
		RateLimitRPM: r.RateLimitRPM, MaxInFlight: r.MaxInFlight, Selector: r.Selector,
		ExternalName: r.ExternalName, Prices: r.Prices, LLMFamily: r.LLMFamily,
		HeaderTimeout: time.Duration(r.HeaderMS) * time.Millisecond, IdleTimeout: time.Duration(r.IdleMS) * time.Millisecond,
		RequestTimeout: time.Duration(r.RequestMS) * time.Millisecond,
		CreatedAt:      r.CreatedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC(),
	}
	if err := decodeJSON(r.ProxyHeaders, &s.ProxyHeaders); err != nil {
		return s, fmt.Errorf("service %q proxy_headers: %w", r.Name, err)
	}
	if err := decodeJSON(r.Limits, &s.Limits); err != nil {
		return s, fmt.Errorf("service %q limits: %w", r.Name, err)
	}
	if err := decodeJSON(r.KeyPolicy, &s.KeyPolicy); err != nil {
		return s, fmt.Errorf("service %q key_policy: %w", r.Name, err)
	}
	if err := decodeJSON(r.Routes, &s.Routes); err != nil {
		return s, fmt.Errorf("service %q routes: %w", r.Name, err)
	}
	if err := decodeJSON(r.Router, &s.Router); err != nil {
		return s, fmt.Errorf("service %q router: %w", r.Name, err)
	}
	return s, nil
}

func teamToRow(t *store.Team) (teamRow, error) {
	r := teamRow{ID: t.ID, Name: t.Name, Description: t.Description, CreatedAt: t.CreatedAt, UpdatedAt: t.UpdatedAt}
	var err error
	if r.AllowedServices, err = encodeJSON(t.AllowedServices, len(t.AllowedServices) == 0); err != nil {
		return r, err
	}
	if r.Limits, err = encodeLimits(t.Limits); err != nil {
		return r, err
	}
	return r, nil
}

func teamFromRow(r *teamRow) (store.Team, error) {
	t := store.Team{ID: r.ID, Name: r.Name, Description: r.Description, CreatedAt: r.CreatedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC()}
	if err := decodeJSON(r.AllowedServices, &t.AllowedServices); err != nil {
		return t, fmt.Errorf("team %s allowed_services: %w", r.ID, err)
	}
	if err := decodeJSON(r.Limits, &t.Limits); err != nil {
		return t, fmt.Errorf("team %s limits: %w", r.ID, err)
	}
	return t, nil
}

func userFromRow(r *userRow) store.User {
	return store.User{ID: r.ID, ExternalID: r.ExternalID, TeamID: r.TeamID, Disabled: r.Disabled, CreatedAt: r.CreatedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC()}
}

func utcPtr(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	u := t.UTC().Truncate(time.Microsecond)
	return &u
}

func tokenToRow(t *store.Token) (tokenRow, error) {
	r := tokenRow{
		ID: t.ID, Name: t.Name, Description: t.Description, TeamID: t.TeamID, Prefix: t.Prefix, Hash: t.Hash,
		ExpiresAt: utcPtr(t.ExpiresAt), IsActive: t.IsActive, LastUsedAt: utcPtr(t.LastUsedAt),
		CreatedAt: t.CreatedAt, UpdatedAt: t.UpdatedAt,
	}
	if t.UserID != "" {
		u := t.UserID
		r.UserID = &u
	}
	var err error
	if r.Scopes, err = encodeJSON(t.Scopes, len(t.Scopes) == 0); err != nil {
		return r, err
	}
	if r.Limits, err = encodeLimits(t.Limits); err != nil {
		return r, err
	}
	return r, nil
}

func tokenFromRow(r *tokenRow) (store.Token, error) {
	t := store.Token{
		ID: r.ID, Name: r.Name, Description: r.Description, TeamID: r.TeamID, Prefix: r.Prefix, Hash: r.Hash,
		ExpiresAt: utcPtr(r.ExpiresAt), IsActive: r.IsActive, LastUsedAt: utcPtr(r.LastUsedAt),
		CreatedAt: r.CreatedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC(),
	}
	if r.UserID != nil {
		t.UserID = *r.UserID
	}
	if err := decodeJSON(r.Scopes, &t.Scopes); err != nil {
		return t, fmt.Errorf("token %s scopes: %w", r.ID, err)
	}
	if err := decodeJSON(r.Limits, &t.Limits); err != nil {
		return t, fmt.Errorf("token %s limits: %w", r.ID, err)
	}
	return t, nil
}
