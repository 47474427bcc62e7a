package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/meter"
	"github.com/keypool/keypool/route"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/external"
)

// Defaults applied by [New] to zero [Config] fields.
const (
	DefaultListen       = ":8080"
	DefaultDatabase     = "sqlite:./data/keypool.db"
	DefaultDrainTimeout = 30 * time.Second
	DefaultMaxBodyBytes = 32 << 20
	DefaultLeaseTTL     = 10 * time.Minute
	// DefaultBodyIdleTimeout and DefaultBodyTimeout bound reading a
	// request body: no byte for 30 s, or the whole body not in within
	// 5 minutes (32 MiB then needs about 110 KB/s), is 408.
	DefaultBodyIdleTimeout = 30 * time.Second
	DefaultBodyTimeout     = 5 * time.Minute
	// DefaultBodyMinRate is the slowest a request body may arrive once
	// the idle timeout has passed since its first byte, in bytes a second
	// (Apache's mod_reqtimeout default): 1 byte/s is cut after about 30 s.
	DefaultBodyMinRate = 500
	// DefaultUpstreamHeaderTimeout, DefaultUpstreamIdleTimeout and
	// DefaultUpstreamTimeout are the upstream timeouts of a service that
	// sets none: 10 minutes to the response headers per attempt (enough
	// for a long non-streaming LLM answer), 5 minutes between reads of a
	// response body (stream events), 30 minutes for the whole request.
	DefaultUpstreamHeaderTimeout = 10 * time.Minute
	DefaultUpstreamIdleTimeout   = 5 * time.Minute
	DefaultUpstreamTimeout       = 30 * time.Minute
	DefaultSyncInterval          = 5 * time.Second
	// DefaultOutputTokens is the output token estimate of a metered
	// request that sets no max_tokens.
	DefaultOutputTokens = 1024
)

// Names of the files [New] writes to [Config.DataDir] when it generates a
// secret (each created with mode 0600).
const (
	AdminTokenFile    = "admin_token"
	EncryptionKeyFile = "encryption.key"
)

// Duration is a time.Duration that reads from JSON and YAML as a duration
// string ("30s", "1m") or a number of seconds.
type Duration = external.Duration

// Config is every setting of a keypoold server. The zero value is a working
// server: SQLite under ./data, generated secrets (see [New]), JSON logs at
// info level, listening on :8080.
//
// Secret-bearing fields are typed so that printing a Config (%v, %+v, JSON,
// slog) never shows them: [keypool.Secret] always prints "[redacted]" and
// [SecretURL] hides a URL's password.
type Config struct {
	// Listen is the address [Server.Run] listens on. If empty, ":8080".
	Listen string `json:"listen,omitempty" yaml:"listen,omitempty"`
	// Database is "sqlite:PATH" (also "file:PATH" or a bare path) or a
	// "postgres://" URL. If empty, "sqlite:./data/keypool.db".
	Database SecretURL `json:"database,omitempty" yaml:"database,omitempty"`
	// DataDir is where generated secrets are kept (AdminTokenFile,
	// EncryptionKeyFile). If empty, the directory of a SQLite database, or
	// "./data" with PostgreSQL.
	DataDir string `json:"data_dir,omitempty" yaml:"data_dir,omitempty"`
	// AdminToken is the admin bearer token. If empty, it is read from
	// DataDir/admin_token, or generated there (mode 0600) and announced
	// once on Output.
	AdminToken keypool.Secret `json:"admin_token,omitempty" yaml:"admin_token,omitempty"`
	// EncryptionKey is a comma-separated list of 64-hex-character AES-256
	// keys; the first seals, all open (rotation). If empty, it is read
	// from DataDir/encryption.key, or generated there, with a warning on
	// every start: a key beside the database protects nothing against
	// whoever can read the database.
	EncryptionKey keypool.Secret `json:"encryption_key,omitempty" yaml:"encryption_key,omitempty"`
	// RedisURL, when set, makes rate limits shared by every replica using
	// the same Redis (redis://host:port/db).
	RedisURL SecretURL `json:"redis_url,omitempty" yaml:"redis_url,omitempty"`
	// ExternalDatabase is "sqlite:PATH" or a "postgres://" URL of an
	// external credential table, opened read only. Empty: none.
	ExternalDatabase SecretURL `json:"external_database,omitempty" yaml:"external_database,omitempty"`
	// External describes the external credential table (table and column
	// names, refresh interval, service mapping).
	External external.Config `json:"external,omitzero" yaml:"external,omitempty"`
	// Services declares services and their keys as code; [New] creates
	// or updates them in the store at start (see [ServiceSpec]).
	Services []ServiceSpec `json:"services,omitempty" yaml:"services,omitempty"`
	// Tiers declares tiers (features with requests per minute) that keys
	// join; [New] creates or updates them in the store at start, before
	// the services (see [TierSpec]).
	Tiers []TierSpec `json:"tiers,omitempty" yaml:"tiers,omitempty"`

	// LogLevel is debug, info, warn or error. If empty, info.
	LogLevel string `json:"log_level,omitempty" yaml:"log_level,omitempty"`
	// LogFormat is json or text. If empty, json.
	LogFormat string `json:"log_format,omitempty" yaml:"log_format,omitempty"`

	// DrainTimeout bounds how long a shutdown waits for in-flight
	// requests before closing their connections. If zero, 30s.
	DrainTimeout Duration `json:"drain_timeout,omitempty" yaml:"drain_timeout,omitempty"`
	// MaxBodyBytes caps proxied request bodies (413 request_too_large).
	// If zero, 32 MiB.
	MaxBodyBytes int64 `json:"max_body_bytes,omitempty" yaml:"max_body_bytes,omitempty"`
	// LeaseTTL is how long a key leased by GET /key stays taken before it
	// is returned without a report. If zero, 10 minutes.
	LeaseTTL Duration `json:"lease_ttl,omitempty" yaml:"lease_ttl,omitempty"`
	// BodyIdleTimeout cuts a request whose body sends no byte for this
	// long with 408 request_timeout. If zero, 30s.
	BodyIdleTimeout Duration `json:"body_idle_timeout,omitempty" yaml:"body_idle_timeout,omitempty"`
	// BodyTimeout cuts a request whose whole body has not arrived this
	// long after its first read with 408 request_timeout, however it
	// trickles. If zero, 5 minutes.
	BodyTimeout Duration `json:"body_timeout,omitempty" yaml:"body_timeout,omitempty"`
	// BodyMinRate cuts a request whose body arrives slower than this many
	// bytes a second, counted from BodyIdleTimeout after its first read
	// (the deadline grows by one second per BodyMinRate bytes received),
	// with 408 request_timeout. If zero, 500; negative: no rate bound.
	BodyMinRate int64 `json:"body_min_rate,omitempty" yaml:"body_min_rate,omitempty"`
	// UpstreamHeaderTimeout bounds how long one attempt waits for an
	// upstream's response headers before the key counts a Failure and the
	// next key is tried (504 upstream_timeout when none is left). If zero,
	// 10 minutes. A service's header_timeout overrides it.
	UpstreamHeaderTimeout Duration `json:"upstream_header_timeout,omitempty" yaml:"upstream_header_timeout,omitempty"`
	// UpstreamIdleTimeout bounds the wait for each read of an upstream
	// response body (the gap between stream events). If zero, 5 minutes.
	// A service's idle_timeout overrides it.
	UpstreamIdleTimeout Duration `json:"upstream_idle_timeout,omitempty" yaml:"upstream_idle_timeout,omitempty"`
	// UpstreamTimeout bounds a whole proxied request, failover and
	// response body included (WebSockets excepted). If zero, 30 minutes.
	// A service's request_timeout overrides it.
	UpstreamTimeout Duration `json:"upstream_timeout,omitempty" yaml:"upstream_timeout,omitempty"`
	// SyncInterval is how often the store is polled for changes (a
	// cheap version query); PostgreSQL also pushes changes with LISTEN. If
	// zero, 5s.
	SyncInterval Duration `json:"sync_interval,omitempty" yaml:"sync_interval,omitempty"`
	// AuthCacheTTL bounds how long a revoked or expired token keeps
	// working. If zero, the auth package's default (at most 5s).
	AuthCacheTTL Duration `json:"auth_cache_ttl,omitempty" yaml:"auth_cache_ttl,omitempty"`
	// Usage configures the batching of usage records.
	Usage store.UsageWriterOptions `json:"usage,omitzero" yaml:"usage,omitempty"`
	// UsageJournal configures the local journal that makes usage records
	// survive a crash of the process (see [JournalConfig]).
	UsageJournal JournalConfig `json:"usage_journal,omitzero" yaml:"usage_journal,omitempty"`
	// PricesFile is a YAML or JSON price file (the format of the shipped
	// meter/prices.yaml, or a bare map of model to price) whose entries
	// replace or add to the shipped table for every service; a service's
	// own prices (admin API) override both. Empty: the shipped table only.
	PricesFile string `json:"prices_file,omitempty" yaml:"prices_file,omitempty"`
	// DefaultOutputTokens is the output estimate reserved against token
	// and cost budgets for a request that sets no max_tokens (nor
	// max_completion_tokens, max_output_tokens, maxOutputTokens). If zero,
	// 1024 (see README, "Budgets and limits").
	DefaultOutputTokens int64 `json:"default_output_tokens,omitempty" yaml:"default_output_tokens,omitempty"`

	// Now returns the current time for client limits, budgets and usage
	// records (tests fake it to cross a UTC day). If nil, time.Now.
	Now func() time.Time `json:"-" yaml:"-"`

	// Logger, if set, is used instead of one built from LogLevel,
	// LogFormat and LogOutput.
	Logger *slog.Logger `json:"-" yaml:"-"`
	// LogOutput is where logs are written. If nil, os.Stderr. Lines are
	// buffered and written at least every 100 ms, and at shutdown.
	LogOutput io.Writer `json:"-" yaml:"-"`
	// Output receives the one-time notice of a generated admin token and
	// the generated-encryption-key warning: never the logs, so the token
	// is not shipped to a log pipeline. If nil, os.Stderr.
	Output io.Writer `json:"-" yaml:"-"`
	// AllowMetadataUpstreams lets services reach link-local and cloud
	// metadata addresses (169.254.169.254 and the like), which are refused
	// by default, both in base_url and at connect time.
	AllowMetadataUpstreams bool `json:"allow_metadata_upstreams,omitempty" yaml:"allow_metadata_upstreams,omitempty"`

	// TrustedProxies lists the addresses or CIDR ranges of load balancers
	// in front of keypoold. A request from one of them is attributed to
	// the right-most X-Forwarded-For address that is not itself trusted
	// (for the failed-token slowdown and the access log); from anywhere
	// else, X-Forwarded-For is ignored. Empty: the peer address counts.
	TrustedProxies []string `json:"trusted_proxies,omitempty" yaml:"trusted_proxies,omitempty"`

	// Console configures admin sign-in (sessions) and the web console.
	Console ConsoleConfig `json:"console,omitzero" yaml:"console,omitempty"`
	// OIDC configures sign-in with Google or any OpenID Connect provider
	// (/auth/login): people get their own tokens without an admin.
	OIDC OIDCConfig `json:"oidc,omitzero" yaml:"oidc,omitempty"`

	// Limits sets the fail policies and timeouts of limits and budgets
	// shared on Redis (see [LimitsConfig]).
	Limits LimitsConfig `json:"limits,omitzero" yaml:"limits,omitempty"`

	// Upstream is the transport used to reach upstreams. If nil, a clone
	// of http.DefaultTransport tuned for many connections per host.
	Upstream http.RoundTripper `json:"-" yaml:"-"`

	// Selectors, AuthSchemes and Classifiers register policies by name,
	// besides the built-in ones: a service may then name them as its
	// selector, auth_scheme or classifier, through the admin API or the
	// configuration file, and the pool uses them. Names are matched in
	// lower case and must not be built-in names. Selectors makes a new
	// selector per service (a service keeps it while its selector name is
	// unchanged). Nil: the built-in names only.
	Selectors   map[string]func() keypool.Selector `json:"-" yaml:"-"`
	AuthSchemes map[string]keypool.AuthScheme      `json:"-" yaml:"-"`
	Classifiers map[string]keypool.Classifier      `json:"-" yaml:"-"`

	// Store, if set, is the store the server uses instead of opening
	// Database: a ready [store.Store] that the server closes at shutdown.
	// It seals its own secrets: EncryptionKey is not used.
	// The server uses the optional interfaces it implements (see
	// [New]); [store.AdminStore] is required.
	Store store.Store `json:"-" yaml:"-"`
}

// registry returns the policies registered in c; nil when none is.
func (c *Config) registry() *store.Registry {
	if len(c.Selectors) == 0 && len(c.AuthSchemes) == 0 && len(c.Classifiers) == 0 {
		return nil
	}
	return &store.Registry{Selectors: c.Selectors, AuthSchemes: c.AuthSchemes, Classifiers: c.Classifiers}
}

// validator returns the rules services and keys are checked by.
func (c *Config) validator() store.Validator {
	return store.Validator{Registry: c.registry(), AllowMetadataUpstreams: c.AllowMetadataUpstreams}
}

// ServiceSpec is a service declared in the configuration file. Its fields
// mirror POST /admin/services; Keys mirror POST /admin/keys; both are
// checked by the admin API's rules ([store.Validator], with the names
// registered in [Config.Selectors], [Config.AuthSchemes] and
// [Config.Classifiers]), so a file the admin API would refuse does not
// start. At start the
// service is created, or updated to match; each key is added unless the
// service already holds the same value. Keys removed from the file are
// not deleted from the store.
type ServiceSpec struct {
	Name        string `json:"name" yaml:"name"`
	DisplayName string `json:"display_name,omitempty" yaml:"display_name,omitempty"`
	// Description says what the service is for (listings, GET /services).
	Description string `json:"description,omitempty" yaml:"description,omitempty"`
	// IsActive false switches the service off (403 forbidden on the proxy
	// and leases; keys kept). Unset: active when created, unchanged after.
	IsActive *bool `json:"is_active,omitempty" yaml:"is_active,omitempty"`
	// Kind is "router" for a router: no base_url and no keys; Routes send
	// each request by its model to the services that serve it.
	Kind   string        `json:"kind,omitempty" yaml:"kind,omitempty"`
	Routes []store.Route `json:"routes,omitempty" yaml:"routes,omitempty"`
	// Router is a router's attempt budget and breaker settings
	// (max_attempts, breaker_failures, breaker_open_seconds,
	// breaker_max_open_seconds); absent means the defaults.
	Router       *store.RouterSettings `json:"router,omitempty" yaml:"router,omitempty"`
	BaseURL      string                `json:"base_url" yaml:"base_url"`
	AuthScheme   string                `json:"auth_scheme,omitempty" yaml:"auth_scheme,omitempty"`
	RateLimitRPM int                   `json:"rate_limit_rpm,omitempty" yaml:"rate_limit_rpm,omitempty"`
	MaxInFlight  int                   `json:"max_in_flight,omitempty" yaml:"max_in_flight,omitempty"`
	ProxyHeaders map[string]string     `json:"proxy_headers,omitempty" yaml:"proxy_headers,omitempty"`
	Selector     string                `json:"selector,omitempty" yaml:"selector,omitempty"`
	ExternalName string                `json:"external_name,omitempty" yaml:"external_name,omitempty"`
	// Classifier names a classifier registered in [Config.Classifiers];
	// empty means the built-in one.
	Classifier string `json:"classifier,omitempty" yaml:"classifier,omitempty"`
	// RPMLimit limits every client of the service together (requests per
	// minute), like a team's rpm_limit.
	RPMLimit int `json:"rpm_limit,omitempty" yaml:"rpm_limit,omitempty"`
	// LLMFamily is the metered wire format: openai, anthropic, gemini,
	// none, or empty to detect it per request. Kept as stored when empty.
	LLMFamily string `json:"llm_family,omitempty" yaml:"llm_family,omitempty"`
	// Prices overrides prices for this service's models (model → price).
	// Kept as stored when empty.
	Prices map[string]meter.Price `json:"prices,omitempty" yaml:"prices,omitempty"`
	// ModelsEnabled lists the models clients may call; kept as stored
	// when empty.
	ModelsEnabled []string `json:"models_enabled,omitempty" yaml:"models_enabled,omitempty"`
	// RetryAfterCap, ConfirmRefusals, MinActiveKeys and MaxEjectionPercent
	// are the service's key policy (store.KeyPolicy, as in POST
	// /admin/services); zero means the default.
	RetryAfterCap      int `json:"retry_after_cap,omitempty" yaml:"retry_after_cap,omitempty"`
	ConfirmRefusals    int `json:"confirm_refusals,omitempty" yaml:"confirm_refusals,omitempty"`
	MinActiveKeys      int `json:"min_active_keys,omitempty" yaml:"min_active_keys,omitempty"`
	MaxEjectionPercent int `json:"max_ejection_percent,omitempty" yaml:"max_ejection_percent,omitempty"`
	// HeaderTimeout, IdleTimeout and RequestTimeout override the server's
	// upstream timeouts for this service (see [Config.UpstreamHeaderTimeout]);
	// kept as stored when zero.
	HeaderTimeout  Duration  `json:"header_timeout,omitempty" yaml:"header_timeout,omitempty"`
	IdleTimeout    Duration  `json:"idle_timeout,omitempty" yaml:"idle_timeout,omitempty"`
	RequestTimeout Duration  `json:"request_timeout,omitempty" yaml:"request_timeout,omitempty"`
	Keys           []KeySpec `json:"keys,omitempty" yaml:"keys,omitempty"`
}

// KeySpec is an upstream key declared in the configuration file. Write its
// value as a ${ENV} reference, not inline.
type KeySpec struct {
	KeyValue     keypool.Secret    `json:"key_value" yaml:"key_value"`
	Weight       int               `json:"weight,omitempty" yaml:"weight,omitempty"`
	Priority     int               `json:"priority,omitempty" yaml:"priority,omitempty"`
	RateLimitRPM int               `json:"rate_limit_rpm,omitempty" yaml:"rate_limit_rpm,omitempty"`
	MaxInFlight  int               `json:"max_in_flight,omitempty" yaml:"max_in_flight,omitempty"`
	Labels       map[string]string `json:"labels,omitempty" yaml:"labels,omitempty"`
	BalanceTotal float64           `json:"balance_total,omitempty" yaml:"balance_total,omitempty"`
	BalanceUnit  string            `json:"balance_unit,omitempty" yaml:"balance_unit,omitempty"`
	AccountEmail string            `json:"account_email,omitempty" yaml:"account_email,omitempty"`
	// Tier names the tier the key joins: one of the file's tiers or one
	// already stored.
	Tier string `json:"tier,omitempty" yaml:"tier,omitempty"`
}

// Environment variables read by [Config.ApplyEnv].
const (
	EnvListen           = "KEYPOOL_LISTEN"
	EnvDatabase         = "KEYPOOL_DATABASE"
	EnvAdminToken       = "KEYPOOL_ADMIN_TOKEN"
	EnvEncryptionKey    = "KEYPOOL_ENCRYPTION_KEY"
	EnvRedisURL         = "KEYPOOL_REDIS_URL"
	EnvConfig           = "KEYPOOL_CONFIG"
	EnvLogLevel         = "KEYPOOL_LOG_LEVEL"
	EnvLogFormat        = "KEYPOOL_LOG_FORMAT"
	EnvExternalDatabase = "KEYPOOL_EXTERNAL_DATABASE"
	EnvDataDir          = "KEYPOOL_DATA_DIR"
	EnvDrainTimeout     = "KEYPOOL_DRAIN_TIMEOUT"
	EnvPrices           = "KEYPOOL_PRICES"
	EnvTrustedProxies   = "KEYPOOL_TRUSTED_PROXIES"
	EnvBodyIdleTimeout  = "KEYPOOL_BODY_IDLE_TIMEOUT"
	EnvBodyTimeout      = "KEYPOOL_BODY_TIMEOUT"
	EnvBodyMinRate      = "KEYPOOL_BODY_MIN_RATE"
	// EnvUsageJournal is "off" to disable the usage journal, or its
	// directory.
	EnvUsageJournal = "KEYPOOL_USAGE_JOURNAL"
)

// ApplyEnv overrides c with the KEYPOOL_* variables that lookup finds set
// and non-empty (pass os.LookupEnv). KEYPOOL_CONFIG is not read here: the
// caller loads the file first (see [LoadFile]) and applies the
// environment over it.
func (c *Config) ApplyEnv(lookup func(string) (string, bool)) error {
	get := func(name string) (string, bool) {
		v, ok := lookup(name)
		if !ok || strings.TrimSpace(v) == "" {
			return "", false
		}
		return strings.TrimSpace(v), true
	}
	if v, ok := get(EnvListen); ok {
		c.Listen = v
	}
	if v, ok := get(EnvDatabase); ok {
		c.Database = SecretURL(v)
	}
	if v, ok := get(EnvAdminToken); ok {
		c.AdminToken = keypool.Secret(v)
	}
	if v, ok := get(EnvEncryptionKey); ok {
		c.EncryptionKey = keypool.Secret(v)
	}
	if v, ok := get(EnvRedisURL); ok {
		c.RedisURL = SecretURL(v)
	}
	if v, ok := get(EnvExternalDatabase); ok {
		c.ExternalDatabase = SecretURL(v)
	}
	if v, ok := get(EnvLogLevel); ok {
		c.LogLevel = v
	}
	if v, ok := get(EnvTrustedProxies); ok {
		c.TrustedProxies = strings.Split(v, ",")
	}
	if v, ok := get(EnvLogFormat); ok {
		c.LogFormat = v
	}
	if v, ok := get(EnvDataDir); ok {
		c.DataDir = v
	}
	if v, ok := get(EnvPrices); ok {
		c.PricesFile = v
	}
	if v, ok := get(EnvUsageJournal); ok {
		if strings.EqualFold(v, "off") {
			c.UsageJournal.Disabled = true
		} else {
			c.UsageJournal.Disabled, c.UsageJournal.Dir = false, v
		}
	}
	if err := c.Console.applyEnv(get); err != nil {
		return err
	}
	if err := c.OIDC.applyEnv(get); err != nil {
		return err
	}
	for _, d := range [...]struct {
		env string
		dst *Duration
	}{{EnvDrainTimeout, &c.DrainTimeout}, {EnvBodyIdleTimeout, &c.BodyIdleTimeout}, {EnvBodyTimeout, &c.BodyTimeout}} {
		if v, ok := get(d.env); ok {
			if err := d.dst.UnmarshalText([]byte(v)); err != nil {
				return fmt.Errorf("server: %s: %w", d.env, err)
			}
		}
	}
	if v, ok := get(EnvBodyMinRate); ok {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return fmt.Errorf("server: %s: %q is not a whole number of bytes a second", EnvBodyMinRate, v)
		}
		c.BodyMinRate = n
	}
	return nil
}

// JournalConfig configures the usage journal: every usage record is
// appended to a local file (written to the operating system before the
// request finishes) and replayed into the store on the next start if the
// process dies before the store has it. Each process writes its own files
// in Dir; replicas may share it.
type JournalConfig struct {
	// Disabled turns the journal off: a crash then loses the records not
	// yet written to the store (up to about Usage.Interval of traffic).
	Disabled bool `json:"disabled,omitempty" yaml:"disabled,omitempty"`
	// Dir is the journal directory, on a local file system. If empty,
	// DataDir/journal.
	Dir string `json:"dir,omitempty" yaml:"dir,omitempty"`
	// SyncInterval is how often the journal is flushed to stable storage
	// (fdatasync, group commit): what an operating-system crash or power
	// loss can lose. A process crash loses nothing. If zero, 1s.
	SyncInterval Duration `json:"sync_interval,omitempty" yaml:"sync_interval,omitempty"`
	// SegmentBytes is the size at which a journal file is rotated. If
	// zero, 8 MiB.
	SegmentBytes int64 `json:"segment_bytes,omitempty" yaml:"segment_bytes,omitempty"`
}

// withDefaults returns c with its zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.Database == "" {
		c.Database = DefaultDatabase
	}
	if c.DataDir == "" {
		c.DataDir = "./data"
		if p, ok := sqlitePath(c.Database.Reveal()); ok {
			c.DataDir = filepath.Dir(p)
		}
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.LogFormat == "" {
		c.LogFormat = "json"
	}
	if c.DrainTimeout <= 0 {
		c.DrainTimeout = Duration(DefaultDrainTimeout)
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = Duration(DefaultLeaseTTL)
	}
	if c.UpstreamHeaderTimeout <= 0 {
		c.UpstreamHeaderTimeout = Duration(DefaultUpstreamHeaderTimeout)
	}
	if c.UpstreamIdleTimeout <= 0 {
		c.UpstreamIdleTimeout = Duration(DefaultUpstreamIdleTimeout)
	}
	if c.UpstreamTimeout <= 0 {
		c.UpstreamTimeout = Duration(DefaultUpstreamTimeout)
	}
	if c.BodyIdleTimeout <= 0 {
		c.BodyIdleTimeout = Duration(DefaultBodyIdleTimeout)
	}
	if c.BodyTimeout <= 0 {
		c.BodyTimeout = Duration(DefaultBodyTimeout)
	}
	if c.BodyMinRate == 0 {
		c.BodyMinRate = DefaultBodyMinRate
	}
	if c.SyncInterval <= 0 {
		c.SyncInterval = Duration(DefaultSyncInterval)
	}
	if c.DefaultOutputTokens <= 0 {
		c.DefaultOutputTokens = DefaultOutputTokens
	}
	return c
}

// Validate reports the first setting that cannot work. [New] calls it.
func (c *Config) Validate() error {
	if err := c.Console.validate(); err != nil {
		return err
	}
	if err := c.OIDC.validate(); err != nil {
		return err
	}
	if err := c.Limits.validate(); err != nil {
		return err
	}
	if _, err := parseLevel(c.LogLevel); c.LogLevel != "" && err != nil {
		return err
	}
	switch strings.ToLower(c.LogFormat) {
	case "", "json", "text":
	default:
		return fmt.Errorf("server: log format %q: want json or text", c.LogFormat)
	}
	if c.MaxBodyBytes < 0 {
		return fmt.Errorf("server: max_body_bytes must not be negative")
	}
	if err := checkDatabase(c.Database, false); err != nil {
		return fmt.Errorf("server: %w", err)
	}
	if err := checkDatabase(c.ExternalDatabase, true); err != nil {
		return fmt.Errorf("server: %w", err)
	}
	if _, err := parsePrefixes(c.TrustedProxies); err != nil {
		return fmt.Errorf("server: trusted_proxies: %w", err)
	}
	if err := validateTiers(c.Tiers); err != nil {
		return err
	}
	if err := c.registry().Check(); err != nil {
		return fmt.Errorf("server: %w", err)
	}
	seen := map[string]bool{}
	v := c.validator()
	for i := range c.Services {
		rec, _, err := c.Services[i].records(v)
		if err != nil {
			return fmt.Errorf("server: services[%d]: %w", i, err)
		}
		if seen[rec.Name] {
			return fmt.Errorf("server: services[%d]: service %q declared twice", i, rec.Name)
		}
		seen[rec.Name] = true
	}
	return nil
}

// records returns the spec as a stored service and keys, checked and
// normalised by v (the admin API's rules).
func (sp *ServiceSpec) records(v store.Validator) (store.Service, []*store.Key, error) {
	rec := store.Service{
		Name: sp.Name, DisplayName: sp.DisplayName, Description: sp.Description, BaseURL: sp.BaseURL,
		AuthScheme: sp.AuthScheme, RateLimitRPM: sp.RateLimitRPM, MaxInFlight: sp.MaxInFlight,
		ProxyHeaders: maps.Clone(sp.ProxyHeaders), Selector: sp.Selector, ExternalName: sp.ExternalName,
		LLMFamily: sp.LLMFamily,
		KeyPolicy: store.KeyPolicy{RetryAfterCap: sp.RetryAfterCap, ConfirmRefusals: sp.ConfirmRefusals,
			MinActiveKeys: sp.MinActiveKeys, MaxEjectionPercent: sp.MaxEjectionPercent, Classifier: sp.Classifier},
		HeaderTimeout: time.Duration(sp.HeaderTimeout), IdleTimeout: time.Duration(sp.IdleTimeout),
		RequestTimeout: time.Duration(sp.RequestTimeout),
		Limits:         store.Limits{RPMLimit: sp.RPMLimit, ModelsEnabled: slices.Clone(sp.ModelsEnabled)},
		Kind:           sp.Kind, Routes: sp.Routes,
	}
	if sp.Router != nil {
		rs := *sp.Router
		rec.Router = &rs
	}
	if sp.IsActive != nil {
		rec.Disabled = !*sp.IsActive
	}
	if len(sp.Prices) > 0 {
		b, err := json.Marshal(sp.Prices)
		if err != nil {
			return rec, nil, fmt.Errorf("service %q: prices: %w", sp.Name, err)
		}
		rec.Prices = string(b)
	}
	if err := v.Service(&rec); err != nil {
		return rec, nil, fmt.Errorf("service %q: %s", sp.Name, validationMessage(err))
	}
	if rec.Kind == store.KindRouter {
		// Its targets are checked against the services when the file is
		// applied (checkRoutes); the routes themselves here.
		if len(sp.Keys) > 0 {
			return rec, nil, fmt.Errorf("service %q: a router has no keys: its routes name the services that hold them", sp.Name)
		}
		if _, err := route.Compile(rec.Routes); err != nil {
			return rec, nil, fmt.Errorf("service %q: %w", sp.Name, err)
		}
	}
	keys := make([]*store.Key, len(sp.Keys))
	for j, ks := range sp.Keys {
		if ks.KeyValue.IsZero() {
			return rec, nil, fmt.Errorf("service %q: keys[%d]: key_value is empty (is its ${ENV} variable set?)", sp.Name, j)
		}
		k := &store.Key{
			Service: rec.Name, Secret: ks.KeyValue, Weight: ks.Weight, Priority: ks.Priority,
			RateLimitRPM: ks.RateLimitRPM, MaxInFlight: ks.MaxInFlight, Labels: maps.Clone(ks.Labels),
			BalanceTotal: ks.BalanceTotal, BalanceUnit: ks.BalanceUnit, AccountEmail: ks.AccountEmail,
			Tier: ks.Tier, Status: store.StatusActive,
		}
		if err := v.Key(k); err != nil {
			return rec, nil, fmt.Errorf("service %q: keys[%d]: %s", sp.Name, j, validationMessage(err))
		}
		keys[j] = k
	}
	return rec, keys, nil
}

// validationMessage returns a *store.ValidationError's message, or err's
// text.
func validationMessage(err error) string {
	var ve *store.ValidationError
	if errors.As(err, &ve) {
		return ve.Message
	}
	return err.Error()
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(strings.ToUpper(s))); err != nil {
		return 0, fmt.Errorf("server: log level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

// sqlitePath returns the file path of a SQLite DSN, and false for a
// PostgreSQL URL or an in-memory database.
func sqlitePath(dsn string) (string, bool) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		return "", false
	}
	p := strings.TrimPrefix(strings.TrimPrefix(dsn, "sqlite:"), "file:")
	if i := strings.IndexByte(p, '?'); i >= 0 {
		p = p[:i]
	}
	if p == "" || p == ":memory:" {
		return "", false
	}
	return p, true
}

// SecretURL is a connection string that may carry a password (a database
// or Redis URL). Printing it in any way (String, Format, JSON, slog) hides
// the password; [SecretURL.Reveal] returns it whole.
type SecretURL string

// Reveal returns the full connection string.
func (u SecretURL) Reveal() string { return string(u) }

// String returns the connection string with its password, if any,
// replaced by "xxxxx". A key=value connection string is shown only as
// "[redacted]" when it names a password.
func (u SecretURL) String() string {
	s := string(u)
	if !strings.Contains(s, "://") {
		if strings.Contains(strings.ToLower(s), "password") {
			return "[redacted]"
		}
		return s
	}
	p, err := url.Parse(s)
	if err != nil {
		return "[redacted]"
	}
	q := p.Query()
	changed := false
	for k := range q {
		lk := strings.ToLower(k)
		if strings.Contains(lk, "password") || strings.Contains(lk, "token") || strings.Contains(lk, "secret") {
			q.Set(k, "xxxxx")
			changed = true
		}
	}
	if changed {
		p.RawQuery = q.Encode()
	}
	if p.User != nil {
		if _, ok := p.User.Password(); !ok && p.User.Username() != "" && p.Scheme == "redis" {
			// redis://secret@host: go-redis reads a lone user as a password.
			p.User = url.UserPassword("xxxxx", "")
		}
	}
	return p.Redacted()
}

// GoString returns the same as String.
func (u SecretURL) GoString() string { return strconv.Quote(u.String()) }

// Format writes String for every verb.
func (u SecretURL) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, u.String()) }

// MarshalText encodes String.
func (u SecretURL) MarshalText() ([]byte, error) { return []byte(u.String()), nil }

// UnmarshalText reads the full connection string.
func (u *SecretURL) UnmarshalText(b []byte) error { *u = SecretURL(b); return nil }

// LogValue makes log/slog print String.
func (u SecretURL) LogValue() slog.Value { return slog.StringValue(u.String()) }

// checkDatabase rejects a database setting the stores would misread: the
// main store treats anything but a postgres:// URL as a SQLite path, so
// "mysql://host/db" would silently become the file ./mysql:/host/db. It
// accepts sqlite:PATH (also sqlite://, file:), a plain path and a
// postgres:// or postgresql:// URL; external (the external credential
// table) takes sqlite:PATH or a PostgreSQL URL only.
func checkDatabase(dsn SecretURL, external bool) error {
	s := dsn.Reveal()
	if s == "" {
		return nil
	}
	what, want := "database", "sqlite:PATH, a file path, or a postgres:// URL"
	if external {
		what, want = "external database", "sqlite:PATH or a postgres:// URL"
	}
	for _, p := range []string{"postgres://", "postgresql://", "sqlite:"} {
		if strings.HasPrefix(s, p) {
			return nil
		}
	}
	if scheme, _, ok := strings.Cut(s, "://"); ok && isScheme(scheme) {
		if scheme != strings.ToLower(scheme) {
			return fmt.Errorf("%s %s: write the scheme %q in lower case; want %s", what, dsn, scheme, want)
		}
		if !external && scheme == "file" {
			return nil
		}
		return fmt.Errorf("%s %s: unsupported scheme %q; want %s", what, dsn, scheme, want)
	}
	if external {
		return fmt.Errorf("%s %s: want %s", what, dsn, want)
	}
	return nil
}

// isScheme reports whether s is a URL scheme: a letter, then letters,
// digits, '+', '-' or '.'.
func isScheme(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z':
		case i > 0 && (r >= '0' && r <= '9' || r == '+' || r == '-' || r == '.'):
		default:
			return false
		}
	}
	return true
}
