// Package external is a read-only [store.Source] over a credential table
// that another system owns: a registration bot creates accounts, writes
// their API keys and checks their balances; keypool only reads.
//
// [Open] connects to SQLite ("sqlite:PATH", opened with mode=ro and
// PRAGMA query_only) or PostgreSQL ("postgres://…", every session started
// with default_transaction_read_only=on), so the Source cannot write even
// when its database role could. A role with SELECT on the table is enough.
//
// Rows whose status is [Config.ActiveStatus] become [store.Key] values with
// Origin "external". Column names, the table name and service names are
// mapped by [Config]. Results are cached per external service for
// [Config.Refresh], so calling [Source.Keys] on every request is cheap.
//
// A Source is safe for concurrent use.
package external

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	_ "github.com/mattn/go-sqlite3" // registers the "sqlite3" driver

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
)

// Errors returned by this package, wrapped with %w.
var (
	// ErrInvalidConfig means a [Config] failed validation: a table or
	// column name that is not a plain identifier, an empty service name,
	// a negative refresh.
	ErrInvalidConfig = errors.New("external: invalid config")
	// ErrUnsupportedDSN means the DSN is neither "sqlite:PATH" nor a
	// "postgres://" URL.
	ErrUnsupportedDSN = errors.New("external: unsupported dsn")
)

// Origin is the [store.Key.Origin] of every key this package returns.
const Origin = "external"

// KeyIDPrefix prefixes the table's row id to form a [store.Key.ID].
const KeyIDPrefix = "ext_"

type dialect int

const (
	sqliteDialect dialect = iota
	postgresDialect
)

// allKey is the cache key of Keys(ctx, ""); external service names are
// looked up under their own name.
const allKey = "\x00all"

// Source reads keys from an external credential table. Create it with
// [Open]; it must not be copied.
type Source struct {
	db      *sql.DB
	dialect dialect
	cols    columnSet
	refresh time.Duration
	active  string
	// SQL built once by Open.
	keysOneSQL, keysAllSQL, versionSQL, servicesSQL, probeSQL string

	cache *expirable.LRU[string, *entry]
	now   func() time.Time // injectable in tests

	mapping atomic.Pointer[serviceMap]

	mu sync.Mutex // protects gen, lastData, calls; never held across I/O
	// gen counts changes seen by Version; a load that started under an
	// older gen does not fill the cache.
	gen      uint64
	lastData string
	calls    map[string]*call
}

// entry is one cached read: keys carry the external service name in
// Service and must not be modified.
type entry struct {
	fetched time.Time
	keys    []store.Key
}

// call is one load in flight, shared by concurrent callers.
type call struct {
	done chan struct{}
	keys []store.Key
	err  error
}

// serviceMap is an immutable keypool ↔ external service name mapping.
type serviceMap struct {
	toExt   map[string]string   // keypool → external
	fromExt map[string][]string // external → sorted keypool names
}

func newServiceMap(m map[string]string) *serviceMap {
	sm := &serviceMap{toExt: maps.Clone(m), fromExt: make(map[string][]string)}
	for k, v := range m {
		sm.fromExt[v] = append(sm.fromExt[v], k)
	}
	for _, names := range sm.fromExt {
		slices.Sort(names)
	}
	return sm
}

func (sm *serviceMap) ext(service string) string {
	if e, ok := sm.toExt[service]; ok {
		return e
	}
	return service
}

// keypoolNames returns the keypool services that read rows of external
// service ext: those mapped to it explicitly, or else ext itself.
func (sm *serviceMap) keypoolNames(ext string) []string {
	if names := sm.fromExt[ext]; len(names) > 0 {
		return names
	}
	return []string{ext}
}

// Open connects to the external table named by dsn ("sqlite:PATH" or a
// "postgres://" / "postgresql://" URL) read-only, validates cfg and checks
// that the table and its columns can be selected. The DSN is never part of
// a returned error.
func Open(ctx context.Context, dsn string, cfg Config) (*Source, error) {
	n, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	db, d, err := openDB(dsn)
	if err != nil {
		return nil, err
	}
	s := newSource(db, d, n)
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("external: connect: %w", err)
	}
	rows, err := db.QueryContext(ctx, s.probeSQL)
	if err == nil {
		err = rows.Close()
	}
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("external: select from table %s: %w", n.cfg.Table, err)
	}
	return s, nil
}

func openDB(dsn string) (*sql.DB, dialect, error) {
	switch {
	case strings.HasPrefix(dsn, "sqlite:"):
		path := strings.TrimPrefix(dsn, "sqlite:")
		if strings.HasPrefix(path, "//") { // sqlite:///abs/path
			path = path[2:]
		}
		if path == "" || path == ":memory:" {
			return nil, 0, fmt.Errorf("%w: sqlite needs a file path", ErrUnsupportedDSN)
		}
		db, err := sql.Open("sqlite3", sqliteURI(path))
		if err != nil {
			return nil, 0, fmt.Errorf("external: open sqlite: %w", err)
		}
		db.SetMaxOpenConns(4)
		return db, sqliteDialect, nil
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		pc, err := pgx.ParseConfig(dsn) // its errors redact the password
		if err != nil {
			return nil, 0, fmt.Errorf("external: parse postgres dsn: %w", err)
		}
		// Every session, including any the pool opens later, starts
		// read-only; a write fails with SQLSTATE 25006.
		pc.RuntimeParams["default_transaction_read_only"] = "on"
		if pc.RuntimeParams["application_name"] == "" {
			pc.RuntimeParams["application_name"] = "keypool-external"
		}
		db := stdlib.OpenDB(*pc)
		db.SetMaxOpenConns(4)
		db.SetConnMaxIdleTime(5 * time.Minute)
		return db, postgresDialect, nil
	default:
		return nil, 0, fmt.Errorf("%w: want sqlite:PATH or postgres://", ErrUnsupportedDSN)
	}
}

// sqliteURI builds a read-only SQLite URI for path. mode=ro opens the file
// read-only (and fails if it does not exist); _query_only makes
// mattn/go-sqlite3 set PRAGMA query_only on every connection. immutable is
// deliberately not set: the owner keeps writing the file and we must see
// its changes.
func sqliteURI(path string) string {
	r := strings.NewReplacer("%", "%25", "?", "%3f", "#", "%23")
	return "file:" + r.Replace(path) + "?mode=ro&_query_only=1&_busy_timeout=5000"
}

func newSource(db *sql.DB, d dialect, n normalized) *Source {
	s := &Source{
		db:      db,
		dialect: d,
		cols:    n.cols,
		refresh: n.refresh,
		active:  n.cfg.ActiveStatus,
		now:     time.Now,
		calls:   make(map[string]*call),
		// One entry per external service plus the "all" entry; size 0
		// is unbounded, which is fine for a set of service names.
		cache: expirable.NewLRU[string, *entry](0, nil, n.refresh),
	}
	s.mapping.Store(newServiceMap(n.cfg.Services))

	c, t := n.cols, n.table
	if d == sqliteDialect {
		// SQLite reads an unknown "double-quoted" name as a string
		// literal, so a misspelt column would select a constant; backticks
		// are always identifiers. Names were validated, so a plain
		// replacement is exact.
		bq := func(s string) string { return strings.ReplaceAll(s, `"`, "`") }
		t = bq(t)
		for _, col := range []*column{&c.id, &c.service, &c.apiKey, &c.email, &c.quotaTotal, &c.quotaUsed,
			&c.quotaUnit, &c.status, &c.extra, &c.createdAt, &c.updatedAt} {
			col.quoted = bq(col.quoted)
		}
	}
	sel := func(col column) string {
		if col.quoted == "" {
			return "NULL"
		}
		return col.quoted
	}
	list := strings.Join([]string{
		c.id.quoted, c.service.quoted, c.apiKey.quoted, sel(c.email), sel(c.quotaTotal),
		sel(c.quotaUsed), sel(c.quotaUnit), sel(c.extra), sel(c.createdAt), sel(c.updatedAt),
	}, ", ")
	p1, p2 := "?", "?"
	if d == postgresDialect {
		p1, p2 = "$1", "$2"
	}
	s.keysAllSQL = fmt.Sprintf("SELECT %s FROM %s WHERE %s = %s ORDER BY %s, %s",
		list, t, c.status.quoted, p1, c.service.quoted, c.id.quoted)
	s.keysOneSQL = fmt.Sprintf("SELECT %s FROM %s WHERE %s = %s AND %s = %s ORDER BY %s",
		list, t, c.status.quoted, p1, c.service.quoted, p2, c.id.quoted)
	maxID := c.id.quoted
	if d == postgresDialect {
		maxID = "CAST(" + maxID + " AS TEXT)" // max() is not defined on every type (uuid)
	}
	s.versionSQL = fmt.Sprintf("SELECT count(*), count(CASE WHEN %s = %s THEN 1 END), max(%s), max(%s) FROM %s",
		c.status.quoted, p1, sel(c.updatedAt), maxID, t)
	s.servicesSQL = fmt.Sprintf("SELECT DISTINCT %s FROM %s WHERE %s = %s ORDER BY 1",
		c.service.quoted, t, c.status.quoted, p1)
	s.probeSQL = fmt.Sprintf("SELECT %s, %s FROM %s WHERE 1 = 0", list, c.status.quoted, t)
	return s
}

// Close closes the database connections. The cache's background expiry
// goroutine (one per Source, waking every Refresh/100) belongs to
// golang-lru's expirable package, which as of v2.0.7 offers no way to stop
// it; it holds no connection.
func (s *Source) Close() error { return s.db.Close() }

// Services returns nil: services are defined in keypool, and the external
// table only supplies their keys. See [Source.ExternalServices] for the
// service names the table holds.
func (s *Source) Services(context.Context) ([]store.Service, error) { return nil, nil }

// ExternalServices returns the distinct external service names that have
// active rows, sorted. It is not cached.
func (s *Source) ExternalServices(ctx context.Context) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, s.servicesSQL, s.active)
	if err != nil {
		return nil, fmt.Errorf("external: list services: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var v any
		if err := rows.Scan(&v); err != nil {
			return nil, fmt.Errorf("external: list services: %w", err)
		}
		if name, ok := asString(v); ok && name != "" {
			out = append(out, name)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("external: list services: %w", err)
	}
	return out, nil
}

// MappedServices returns the keypool service names that [Config.Services]
// (or [Source.SetServices]) maps explicitly, sorted. Any other keypool name
// is served too, from external rows of the same name.
func (s *Source) MappedServices() []string {
	return slices.Sorted(maps.Keys(s.mapping.Load().toExt))
}

// ExternalName returns the external service name whose rows feed keypool
// service name.
func (s *Source) ExternalName(service string) string { return s.mapping.Load().ext(service) }

// SetServices replaces the keypool → external service mapping, for example
// from the ExternalName of each service in keypool's own store. The map is
// copied. Cached rows stay valid: the cache is keyed by external name.
func (s *Source) SetServices(m map[string]string) error {
	if err := checkServices(m); err != nil {
		return err
	}
	s.mapping.Store(newServiceMap(m))
	return nil
}

// Keys returns the active keys of keypool service service, read from the
// rows of its external name (see [Config.Services]) and labeled with
// service. With service "", it returns the active keys of every external
// service, each under the keypool names mapped to its external name (under
// its own name when none is), so a row shared by two keypool services is
// returned twice with the same ID: it is one credential.
//
// Results are served from memory for at most [Config.Refresh] after they
// were read. The returned slice and its Labels maps are the caller's.
func (s *Source) Keys(ctx context.Context, service string) ([]store.Key, error) {
	sm := s.mapping.Load()
	if service == "" {
		cached, err := s.load(ctx, allKey, "")
		if err != nil {
			return nil, err
		}
		out := make([]store.Key, 0, len(cached))
		for _, k := range cached {
			for _, name := range sm.keypoolNames(k.Service) {
				out = append(out, cloneKey(k, name))
			}
		}
		return out, nil
	}
	ext := sm.ext(service)
	cached, err := s.load(ctx, ext, ext)
	if err != nil {
		return nil, err
	}
	out := make([]store.Key, len(cached))
	for i, k := range cached {
		out[i] = cloneKey(k, service)
	}
	return out, nil
}

func cloneKey(k store.Key, service string) store.Key {
	k.Service = service
	k.Labels = maps.Clone(k.Labels)
	return k
}

// load returns the cached keys under cacheKey, reading them (once, however
// many callers ask at the same time) when missing or older than refresh.
// ext is the external service to read, "" for all.
func (s *Source) load(ctx context.Context, cacheKey, ext string) ([]store.Key, error) {
	for {
		if e, ok := s.cache.Get(cacheKey); ok && s.now().Sub(e.fetched) < s.refresh {
			return e.keys, nil
		}
		s.mu.Lock()
		if c, ok := s.calls[cacheKey]; ok {
			s.mu.Unlock()
			select {
			case <-c.done:
			case <-ctx.Done():
				return nil, fmt.Errorf("external: keys: %w", ctx.Err())
			}
			if c.err != nil && ctx.Err() == nil &&
				(errors.Is(c.err, context.Canceled) || errors.Is(c.err, context.DeadlineExceeded)) {
				continue // the caller that ran the query gave up; try again with ours
			}
			return c.keys, c.err
		}
		c := &call{done: make(chan struct{})}
		s.calls[cacheKey] = c
		gen := s.gen
		s.mu.Unlock()

		start := s.now()
		keys, err := s.query(ctx, ext)

		s.mu.Lock()
		delete(s.calls, cacheKey)
		if err == nil && gen == s.gen {
			s.cache.Add(cacheKey, &entry{fetched: start, keys: keys})
		}
		s.mu.Unlock()
		c.keys, c.err = keys, err
		close(c.done)
		return keys, err
	}
}

// query reads the active rows of external service ext ("" for all).
// Errors never carry a secret: values are scanned as raw driver values and
// converted here, and any error text containing a key already read is
// redacted.
func (s *Source) query(ctx context.Context, ext string) (keys []store.Key, err error) {
	what := "all services"
	if ext != "" {
		what = "service " + strconv.Quote(ext)
	}
	var secrets []string
	defer func() {
		if err != nil {
			keys = nil
			err = fmt.Errorf("external: read keys of %s: %w", what, redact(err, secrets))
		}
	}()
	var rows *sql.Rows
	if ext == "" {
		rows, err = s.db.QueryContext(ctx, s.keysAllSQL, s.active)
	} else {
		rows, err = s.db.QueryContext(ctx, s.keysOneSQL, s.active, ext)
	}
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var v [10]any
	dest := make([]any, len(v))
	for i := range v {
		dest[i] = &v[i]
	}
	for rows.Next() {
		clear(v[:])
		if err := rows.Scan(dest...); err != nil {
			return nil, err
		}
		k, ok, err := s.toKey(v)
		if err != nil {
			return nil, err
		}
		if ok {
			secrets = append(secrets, k.Secret.Reveal())
			keys = append(keys, k)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return keys, nil
}

// toKey converts one row (in select order) to a key carrying the external
// service name. Rows without an id or an api key are skipped.
func (s *Source) toKey(v [10]any) (store.Key, bool, error) {
	id, _ := asString(v[0])
	svc, _ := asString(v[1])
	secret, _ := asString(v[2])
	secret = strings.TrimSpace(secret)
	if id == "" || secret == "" {
		return store.Key{}, false, nil
	}
	k := store.Key{
		ID:      KeyIDPrefix + id,
		Service: svc,
		Secret:  keypool.Secret(secret),
		Hint:    keypool.Secret(secret).Hint(),
		Status:  store.StatusActive,
		Origin:  Origin,
	}
	k.AccountEmail, _ = asString(v[3])
	var ok bool
	if k.BalanceTotal, ok = asFloat(v[4]); !ok {
		return k, false, fmt.Errorf("row %s: column %s is not a number", id, s.cols.quotaTotal.name)
	}
	if k.BalanceUsed, ok = asFloat(v[5]); !ok {
		return k, false, fmt.Errorf("row %s: column %s is not a number", id, s.cols.quotaUsed.name)
	}
	k.BalanceUnit, _ = asString(v[6])
	k.Labels = labels(v[7])
	k.CreatedAt = asTime(v[8])
	k.UpdatedAt = asTime(v[9])
	return k, true, nil
}

// Version returns a short hash of the table's row count, active row count,
// max(updated_at) and max(id), plus the current refresh period. Inserts,
// deletes, status changes and edits that bump updated_at change it at
// once; other edits (a key rotated in place without touching updated_at)
// are caught when the refresh period rolls over, since the version then
// changes anyway. When the table part changes, cached rows are dropped so
// the reload that follows reads fresh rows.
func (s *Source) Version(ctx context.Context) (string, error) {
	var n, active, maxUpdated, maxID any
	if err := s.db.QueryRowContext(ctx, s.versionSQL, s.active).Scan(&n, &active, &maxUpdated, &maxID); err != nil {
		return "", fmt.Errorf("external: version: %w", err)
	}
	data := fmt.Sprintf("%s|%s|%s|%s", fmtValue(n), fmtValue(active), fmtValue(maxUpdated), fmtValue(maxID))
	s.mu.Lock()
	if data != s.lastData {
		if s.lastData != "" {
			s.gen++
			s.cache.Purge()
		}
		s.lastData = data
	}
	s.mu.Unlock()
	epoch := s.now().UnixNano() / int64(s.refresh)
	sum := sha256.Sum256([]byte(data + "|" + strconv.FormatInt(epoch, 10)))
	return hex.EncodeToString(sum[:8]), nil
}

// redactedError hides secret values that a driver error may quote, while
// errors.Is still sees the original error.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string        { return e.msg }
func (e *redactedError) Is(target error) bool { return errors.Is(e.err, target) }

func redact(err error, secrets []string) error {
	msg := err.Error()
	changed := false
	for _, sec := range secrets {
		if sec != "" && strings.Contains(msg, sec) {
			msg = strings.ReplaceAll(msg, sec, "[redacted]")
			changed = true
		}
	}
	if !changed {
		return err
	}
	return &redactedError{msg: msg, err: err}
}

func asString(v any) (string, bool) {
	switch v := v.(type) {
	case nil:
		return "", false
	case string:
		return v, true
	case []byte:
		return string(v), true
	case int64:
		return strconv.FormatInt(v, 10), true
	case int32:
		return strconv.FormatInt(int64(v), 10), true
	case float64:
		return strconv.FormatFloat(v, 'f', -1, 64), true
	case time.Time:
		return v.UTC().Format(time.RFC3339Nano), true
	case fmt.Stringer:
		return v.String(), true
	default:
		return "", false
	}
}

// asFloat converts a numeric column; NULL and "" are 0. It reports false
// for a value that is not a number (the value is not put in any error).
func asFloat(v any) (float64, bool) {
	switch v := v.(type) {
	case nil:
		return 0, true
	case int64:
		return float64(v), true
	case int32:
		return float64(v), true
	case float64:
		return v, true
	case float32:
		return float64(v), true
	case bool:
		return 0, false
	}
	s, ok := asString(v)
	if !ok {
		return 0, false
	}
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, true
	}
	f, err := strconv.ParseFloat(s, 64)
	return f, err == nil
}

var timeLayouts = []string{
	time.RFC3339Nano,
	"2006-01-02 15:04:05.999999999-07:00",
	"2006-01-02 15:04:05.999999999Z07:00",
	"2006-01-02 15:04:05.999999999",
	"2006-01-02T15:04:05.999999999",
	"2006-01-02 15:04",
	"2006-01-02",
}

// asTime converts a timestamp column leniently: a time, a text timestamp
// in a common layout, or Unix seconds. Anything else is the zero time.
func asTime(v any) time.Time {
	switch v := v.(type) {
	case time.Time:
		return v
	case int64:
		return time.Unix(v, 0).UTC()
	case float64:
		return time.Unix(0, int64(v*float64(time.Second))).UTC()
	}
	s, ok := asString(v)
	if !ok {
		return time.Time{}
	}
	s = strings.TrimSpace(s)
	for _, l := range timeLayouts {
		if t, err := time.Parse(l, s); err == nil {
			return t
		}
	}
	return time.Time{}
}

// labels returns the string values of a JSON object, or nil for NULL,
// invalid JSON or anything but an object.
func labels(v any) map[string]string {
	var raw []byte
	switch v := v.(type) {
	case string:
		raw = []byte(v)
	case []byte:
		raw = v
	case map[string]any: // a driver that decodes json itself
		return stringValues(v)
	default:
		return nil
	}
	var obj map[string]any
	if json.Unmarshal(raw, &obj) != nil {
		return nil
	}
	return stringValues(obj)
}

func stringValues(obj map[string]any) map[string]string {
	var out map[string]string
	for k, v := range obj {
		if s, ok := v.(string); ok {
			if out == nil {
				out = make(map[string]string)
			}
			out[k] = s
		}
	}
	return out
}

// fmtValue formats an aggregate for the version hash.
func fmtValue(v any) string {
	switch v := v.(type) {
	case nil:
		return "∅"
	case time.Time:
		return v.UTC().Format(time.RFC3339Nano)
	case []byte:
		return string(v)
	default:
		return fmt.Sprint(v)
	}
}

var _ store.Source = (*Source)(nil)
