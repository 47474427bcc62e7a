// Package store defines where keypool's configuration and records live:
// [Source], the read-only view that feeds a [keypool.Pool] (services and
// their keys), and [Store], the read-write store behind keypoold's admin API
// (services, keys, teams, users, team tokens and usage records).
//
// Implementations live in sub-packages: store/sqlstore (SQLite and
// PostgreSQL through gorm) and store/external (a read-only credential table
// owned by another system). store/storetest holds the conformance suite
// every Store must pass.
package store

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/keypool/keypool"
)

// Errors returned by every implementation, wrapped with %w; test them with
// errors.Is.
var (
	// ErrNotFound means the record named by an id or name does not exist.
	ErrNotFound = errors.New("store: not found")
	// ErrConflict means a unique field (a service name, a team name, a key
	// value within its service, a token hash) is already taken.
	ErrConflict = errors.New("store: conflict")
	// ErrInvalid means a record failed validation (a missing required field,
	// a reference to a record that does not exist).
	ErrInvalid = errors.New("store: invalid record")
	// ErrReadOnly is returned by a Source that cannot write.
	ErrReadOnly = errors.New("store: read only")
)

// Key statuses as stored. Live, transient states (cooling, open) are kept by
// the pool, not the store.
const (
	StatusActive    = "active"
	StatusDisabled  = "disabled"
	StatusInvalid   = "invalid"
	StatusExhausted = "exhausted"
)

// Limits are the client-side limits a service, team or token can carry,
// named as in the systems keypool replaces. Zero means "no limit".
type Limits struct {
	RPMLimit        int   `json:"rpm_limit,omitempty"`
	TPMLimit        int64 `json:"tpm_limit,omitempty"`
	DailyTokenLimit int64 `json:"daily_token_limit,omitempty"`

	LimitCostHourWarn   float64 `json:"limit_cost_hour_warn,omitempty"`
	LimitCostHourBlock  float64 `json:"limit_cost_hour_block,omitempty"`
	LimitCostDayWarn    float64 `json:"limit_cost_day_warn,omitempty"`
	LimitCostDayBlock   float64 `json:"limit_cost_day_block,omitempty"`
	LimitCostMonthWarn  float64 `json:"limit_cost_month_warn,omitempty"`
	LimitCostMonthBlock float64 `json:"limit_cost_month_block,omitempty"`
	LimitCostTotalBlock float64 `json:"limit_cost_total_block,omitempty"`

	LimitTokensHourWarn   int64 `json:"limit_tokens_hour_warn,omitempty"`
	LimitTokensHourBlock  int64 `json:"limit_tokens_hour_block,omitempty"`
	LimitTokensDayWarn    int64 `json:"limit_tokens_day_warn,omitempty"`
	LimitTokensDayBlock   int64 `json:"limit_tokens_day_block,omitempty"`
	LimitTokensMonthWarn  int64 `json:"limit_tokens_month_warn,omitempty"`
	LimitTokensMonthBlock int64 `json:"limit_tokens_month_block,omitempty"`
	LimitTokensTotalBlock int64 `json:"limit_tokens_total_block,omitempty"`

	// ModelsEnabled lists the models a client may call; empty means all.
	ModelsEnabled []string `json:"models_enabled,omitempty"`
}

// Service is an upstream API as stored.
type Service struct {
	Name        string `json:"name"`
	DisplayName string `json:"display_name,omitempty"`
	// Description says what the service is for (listings, GET /services).
	Description string `json:"description,omitempty"`
	// Kind is "" for an upstream API and [KindRouter] for a router: a
	// service without keys or base_url whose Routes send each request, by
	// the model it names, to other services.
	Kind string `json:"kind,omitempty"`
	// Routes are a router's model routes, tried in order (see package
	// route); empty for other services.
	Routes []Route `json:"routes,omitempty"`
	// Router is a router's attempt budget and breaker settings; nil (or
	// zero fields) means the defaults. Only a router has one.
	Router *RouterSettings `json:"router,omitempty"`
	// Disabled switches the service off: its proxy and leases answer 403
	// forbidden; its keys and their state are kept. The API shows it as
	// is_active false.
	Disabled     bool              `json:"-"`
	BaseURL      string            `json:"base_url"`
	AuthScheme   string            `json:"auth_scheme"`
	RateLimitRPM int               `json:"rate_limit_rpm,omitempty"`
	MaxInFlight  int               `json:"max_in_flight,omitempty"`
	ProxyHeaders map[string]string `json:"proxy_headers,omitempty"`
	Selector     string            `json:"selector,omitempty"`
	ExternalName string            `json:"external_name,omitempty"`
	// Prices overrides the shipped price table for this service's models,
	// as a JSON document (model → price); empty means none.
	Prices string `json:"prices,omitempty"`
	// LLMFamily is the wire format metered on the service's responses:
	// "openai", "anthropic", "gemini" or "none" (no metering); empty means
	// detected per request from the base URL and path.
	LLMFamily string `json:"llm_family,omitempty"`
	// HeaderTimeout, IdleTimeout and RequestTimeout bound the service's
	// upstream requests (see keypool.Service); zero means the server's
	// default. The admin API shows them as duration strings.
	HeaderTimeout  time.Duration `json:"-"`
	IdleTimeout    time.Duration `json:"-"`
	RequestTimeout time.Duration `json:"-"`
	Limits
	KeyPolicy
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// KindRouter is the [Service.Kind] of a router.
const KindRouter = "router"

// Route maps the model a client names (exact, or a glob such as
// "claude-*") to the services that serve it, in order of preference.
type Route struct {
	Model   string   `json:"model"`
	Targets []Target `json:"targets"`
}

// RouterSettings are a router's own attempt budget and per-target
// breakers (see package route). Zero fields take the defaults written
// on each.
type RouterSettings struct {
	// MaxAttempts caps the targets one request tries, 1 to 16. If zero,
	// 3.
	MaxAttempts int `json:"max_attempts,omitempty" yaml:"max_attempts,omitempty"`
	// BreakerFailures is how many failed attempts in a row (5xx) on a
	// target open its breaker, which skips the target for BreakerOpen,
	// then lets one probe through; 1 to 1000. If zero, 3.
	BreakerFailures int `json:"breaker_failures,omitempty" yaml:"breaker_failures,omitempty"`
	// BreakerOpenSeconds is how long a breaker stays open after its
	// first trip; the n-th trip in a row stays n times as long, up to
	// BreakerMaxOpenSeconds. 1 to 86400. If zero, 10.
	BreakerOpenSeconds int `json:"breaker_open_seconds,omitempty" yaml:"breaker_open_seconds,omitempty"`
	// BreakerMaxOpenSeconds caps the grown open period; at least
	// BreakerOpenSeconds, at most 86400. If zero, 300 (or
	// BreakerOpenSeconds when that is larger).
	BreakerMaxOpenSeconds int `json:"breaker_max_open_seconds,omitempty" yaml:"breaker_max_open_seconds,omitempty"`
}

// Target is one service a [Route] may send a request to.
type Target struct {
	// Service names the target service; it must exist and not be a
	// router.
	Service string `json:"service"`
	// Path is the path prefix of the service's OpenAI-compatible API
	// ("/v1", "/v1beta/openai", "/openai/v1"); empty means "/v1".
	Path string `json:"path,omitempty"`
	// Model is the model sent upstream; empty sends the one the client
	// named.
	Model string `json:"model,omitempty"`
	// Weight spreads a route's first choice over the targets that have
	// one, in proportion; targets without weight follow in order.
	Weight int `json:"weight,omitempty"`
}

// KeyPolicy is how a service's pool judges its keys (see
// [keypool.Service]); a zero field takes the default.
type KeyPolicy struct {
	// RetryAfterCap caps the wait a 429's Retry-After imposes on a key, in
	// seconds; longer values are clamped to it. 0: 3600.
	RetryAfterCap int `json:"retry_after_cap,omitempty"`
	// ConfirmRefusals is how many ambiguous refusals (a bare 403 another
	// key then served), from distinct requests with no success between,
	// make a key invalid. 0: 3.
	ConfirmRefusals int `json:"confirm_refusals,omitempty"`
	// MinActiveKeys is the floor of keys in rotation that confirmed
	// refusals may not cross. 0: half the service's keys, rounded up.
	MinActiveKeys int `json:"min_active_keys,omitempty"`
	// MaxEjectionPercent is the largest share of keys the breaker ejects
	// at once (1–100). 0: 50.
	MaxEjectionPercent int `json:"max_ejection_percent,omitempty"`
	// Classifier names a classifier registered with the server (see
	// [Registry]) that decides what an upstream answer says about a key;
	// empty means the built-in [keypool.Classify].
	Classifier string `json:"classifier,omitempty"`
}

// MaxRetryAfterCap is the largest KeyPolicy.RetryAfterCap accepted, in
// seconds: 7 days.
const MaxRetryAfterCap = 7 * 24 * 3600

// Validate reports the first field out of range, naming it as the admin
// API does; the error wraps [ErrInvalid].
func (p KeyPolicy) Validate() error {
	for _, f := range []struct {
		v      int
		name   string
		hi     int
		zeroIs string
	}{
		{p.RetryAfterCap, "retry_after_cap", MaxRetryAfterCap, "seconds; 0 means 3600"},
		{p.ConfirmRefusals, "confirm_refusals", 100, "0 means 3"},
		{p.MinActiveKeys, "min_active_keys", 100000, "0 means half the keys, rounded up"},
		{p.MaxEjectionPercent, "max_ejection_percent", 100, "0 means 50"},
	} {
		if f.v < 0 || f.v > f.hi {
			return invalidf("%s must be 0 to %d (%s), got %d", f.name, f.hi, f.zeroIs, f.v)
		}
	}
	return nil
}

// Key is an upstream credential as stored. Secret holds the plaintext in
// memory only; implementations seal it at rest.
type Key struct {
	ID           string            `json:"id"`
	Service      string            `json:"service"`
	Secret       keypool.Secret    `json:"-"`
	Hint         string            `json:"hint"`
	Weight       int               `json:"weight,omitempty"`
	Priority     int               `json:"priority,omitempty"`
	RateLimitRPM int               `json:"rate_limit_rpm,omitempty"`
	MaxInFlight  int               `json:"max_in_flight,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	BalanceTotal float64           `json:"balance_total,omitempty"`
	BalanceUsed  float64           `json:"balance_used,omitempty"`
	BalanceUnit  string            `json:"balance_unit,omitempty"`
	AccountEmail string            `json:"account_email,omitempty"`
	// Tier names the [Tier] the key belongs to; empty means none. A key's
	// tier must exist.
	Tier string `json:"tier,omitempty"`
	// Features is the key's tier's features (feature → requests per
	// minute), filled when the key is read; it is not written.
	Features map[string]int `json:"features,omitempty"`
	// Status is one of the Status constants; StatusReason says why.
	Status       string `json:"status"`
	StatusReason string `json:"status_reason,omitempty"`
	// Origin is "local" for keys written through the Store, "external" for
	// keys read from an external credential table.
	Origin    string    `json:"origin,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Tier is a named set of features with a requests-per-minute for each:
// every key of the tier serves those features, each at most that many
// times in any minute (see [keypool.Key.Features]).
type Tier struct {
	Name string `json:"name"`
	// Description says what the tier is for (listings).
	Description string         `json:"description,omitempty"`
	Features    map[string]int `json:"features"`
	CreatedAt   time.Time      `json:"created_at"`
	UpdatedAt   time.Time      `json:"updated_at"`
}

// Validate reports the first invalid field of a tier, naming it as the
// admin API does; the error wraps [ErrInvalid].
func (t Tier) Validate() error {
	if t.Name == "" || strings.ContainsAny(t.Name, "/?#% \t\r\n") {
		return invalidf("tier name %q must be non-empty, without '/', '?', '#', '%%' or spaces", t.Name)
	}
	if len(t.Features) == 0 {
		return invalidf("features must name at least one feature")
	}
	for f, rpm := range t.Features {
		if f == "" {
			return invalidf("features: a feature name is empty")
		}
		if rpm < 0 || rpm > 1_000_000 {
			return invalidf("features[%q] must be 0 to 1000000 requests per minute (0: no limit), got %d", f, rpm)
		}
	}
	return nil
}

// TierStore keeps tiers. A [Store] that supports tiers implements it
// (sqlstore does). Every write changes [Source.Version], so pools reload
// the features of the tier's keys.
type TierStore interface {
	// CreateTier inserts a tier; its name is unique (else ErrConflict).
	CreateTier(ctx context.Context, t *Tier) error
	GetTier(ctx context.Context, name string) (Tier, error)
	// ListTiers returns every tier, ordered by name.
	ListTiers(ctx context.Context) ([]Tier, error)
	// UpdateTier replaces the description and features of tier t.Name.
	UpdateTier(ctx context.Context, t *Tier) error
	// DeleteTier deletes a tier no key belongs to (else ErrConflict).
	DeleteTier(ctx context.Context, name string) error
}

// Team is a group of clients sharing limits.
type Team struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	// Description says who the team is (listings).
	Description     string   `json:"description,omitempty"`
	AllowedServices []string `json:"allowed_services,omitempty"`
	Limits
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// User is a person or system in a team.
type User struct {
	ID         string    `json:"id"`
	ExternalID string    `json:"external_id"`
	TeamID     string    `json:"team_id"`
	CreatedAt  time.Time `json:"created_at"`
	UpdatedAt  time.Time `json:"updated_at"`
	// Disabled users get no new token by single sign-on.
	Disabled bool `json:"disabled,omitempty"`
}

// Token is a client credential. Only its hash is stored; the plaintext is
// shown once, when it is created.
type Token struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	// Description says what the token is for (listings).
	Description string `json:"description,omitempty"`
	TeamID      string `json:"team_id"`
	UserID      string `json:"user_id,omitempty"`
	// Prefix is the first characters of the token, for listings.
	Prefix string `json:"prefix"`
	// Hash is the SHA-256 of the token; it is unique.
	Hash      []byte     `json:"-"`
	Scopes    []string   `json:"scopes,omitempty"`
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	IsActive  bool       `json:"is_active"`
	Limits
	LastUsedAt *time.Time `json:"last_used_at,omitempty"`
	CreatedAt  time.Time  `json:"created_at"`
	UpdatedAt  time.Time  `json:"updated_at"`
}

// UsageRecord is one proxied or leased request.
//
// ID is the record's own unique id (a [UsageWriter] stamps one when it is
// empty): the store keeps at most one row per ID, so a record appended
// twice (a journal replayed after a crash, a retried flush) is stored
// once. It is not RequestID, which a client may choose (X-Request-Id) and
// repeat. KeySpend is what the request spent of KeyID's balance, in the
// key's balance unit; the store adds it to the key's balance_used in the
// same transaction as the row, and only when the row is new, so balances
// follow the records exactly. A negative KeySpend ([KeySpendByUnit]) asks
// the store to derive it from the key's balance unit: the cost for "usd",
// the tokens for "tokens", one for a 2xx in "requests".
type UsageRecord struct {
	Time      time.Time `json:"time"`
	ID        string    `json:"id,omitempty"`
	RequestID string    `json:"request_id,omitempty"`
	TeamID    string    `json:"team_id,omitempty"`
	TokenID   string    `json:"token_id,omitempty"`
	Service   string    `json:"service"`
	// Router is the router the request came through ("" for a direct
	// call); Service is then the target that served it and Model the
	// upstream model.
	Router       string  `json:"router,omitempty"`
	KeyID        string  `json:"key_id,omitempty"`
	Model        string  `json:"model,omitempty"`
	Status       int     `json:"status"`
	TokensIn     int64   `json:"tokens_in"`
	TokensOut    int64   `json:"tokens_out"`
	CachedTokens int64   `json:"cached_tokens,omitempty"`
	Cost         float64 `json:"cost"`
	LatencyMS    int64   `json:"latency_ms"`
	KeySpend     float64 `json:"key_spend,omitempty"`

	seg  uint64      // the journal segment holding the record; 0 when none
	pseg uint64      // the journal segment holding its provisional line; 0 when none
	prov provStrings // the provisional line's string fields, while pseg is set
}

// provStrings are the string fields of a record's provisional journal
// line: its final line names only those that changed since.
type provStrings struct {
	requestID, teamID, tokenID, service, router, keyID, model string
}

// KeySpendByUnit is the [UsageRecord.KeySpend] of a record whose spend the
// store derives from its key's balance unit (a provisional record, made
// before the request's spend was known).
const KeySpendByUnit = -1

// Usage grouping dimensions for [UsageQuery.GroupBy].
const (
	GroupTeam    = "team"
	GroupToken   = "token"
	GroupService = "service"
	GroupRouter  = "router"
	GroupKey     = "key"
	GroupModel   = "model"
	GroupDay     = "day"
)

// UsageQuery filters and groups usage records. Empty filters match all;
// Since is inclusive, Until exclusive; zero times are open-ended.
type UsageQuery struct {
	Team, Token, Service, Key, Model string
	Since, Until                     time.Time
	GroupBy                          []string
}

// UsageRow is one group of a usage query. Group maps each GroupBy dimension
// to its value (an id, a service name, a model, or a day as 2006-01-02).
type UsageRow struct {
	Group     map[string]string `json:"group"`
	Requests  int64             `json:"requests"`
	TokensIn  int64             `json:"tokens_in"`
	TokensOut int64             `json:"tokens_out"`
	Cost      float64           `json:"cost"`
}

// Source is a read-only view of services and their keys: what a
// [keypool.Pool] is loaded from.
type Source interface {
	// Services returns every service.
	Services(ctx context.Context) ([]Service, error)
	// Keys returns the keys of one service, or of all services when
	// service is "". Secrets are decrypted.
	Keys(ctx context.Context, service string) ([]Key, error)
	// Version returns a token that changes whenever a service or key
	// changes; it must be cheap (one small query).
	Version(ctx context.Context) (string, error)
}

// Store is the read-write store behind keypoold.
type Store interface {
	Source

	CreateService(ctx context.Context, s *Service) error
	GetService(ctx context.Context, name string) (Service, error)
	UpdateService(ctx context.Context, s *Service) error
	// DeleteService deletes a service and its keys.
	DeleteService(ctx context.Context, name string) error

	// CreateKeys inserts keys all or nothing, assigning ids.
	CreateKeys(ctx context.Context, keys []*Key) error
	GetKey(ctx context.Context, id string) (Key, error)
	UpdateKey(ctx context.Context, k *Key) error
	// SetKeyStatus changes only a key's status and reason.
	SetKeyStatus(ctx context.Context, id, status, reason string) error
	// AddKeySpend adds amount to a key's BalanceUsed.
	AddKeySpend(ctx context.Context, id string, amount float64) error
	DeleteKey(ctx context.Context, id string) error

	CreateTeam(ctx context.Context, t *Team) error
	GetTeam(ctx context.Context, id string) (Team, error)
	ListTeams(ctx context.Context) ([]Team, error)
	UpdateTeam(ctx context.Context, t *Team) error
	// DeleteTeam deletes a team with its users and tokens.
	DeleteTeam(ctx context.Context, id string) error

	CreateUser(ctx context.Context, u *User) error
	GetUser(ctx context.Context, id string) (User, error)
	ListUsers(ctx context.Context, teamID string) ([]User, error)
	UpdateUser(ctx context.Context, u *User) error
	// DeleteUser deletes a user and its tokens.
	DeleteUser(ctx context.Context, id string) error

	CreateToken(ctx context.Context, t *Token) error
	GetToken(ctx context.Context, id string) (Token, error)
	GetTokenByHash(ctx context.Context, hash []byte) (Token, error)
	ListTokens(ctx context.Context, teamID string) ([]Token, error)
	UpdateToken(ctx context.Context, t *Token) error
	DeleteToken(ctx context.Context, id string) error

	// AppendUsage stores usage records, skipping any whose ID is already
	// stored, and adds the KeySpend of the records it stores to their
	// keys' BalanceUsed, all in one transaction.
	AppendUsage(ctx context.Context, recs []UsageRecord) error
	QueryUsage(ctx context.Context, q UsageQuery) ([]UsageRow, error)
	// PruneUsage deletes usage records older than before.
	PruneUsage(ctx context.Context, before time.Time) (int64, error)

	// Ping reports whether the database answers.
	Ping(ctx context.Context) error
	Close() error
}
