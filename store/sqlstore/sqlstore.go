// Package sqlstore is the gorm implementation of [store.Store] on SQLite
// (the embedded default) and PostgreSQL (production, several replicas).
//
// # Opening
//
// [Open] takes a DSN: "sqlite:PATH", "file:PATH" or a plain file path for
// SQLite (parent directories are created), or a "postgres://" /
// "postgresql://" URL. It migrates the schema before it returns; migrations
// are versioned in the schema_migrations table, so opening twice is a no-op
// and an older database is upgraded in place. On PostgreSQL the migration
// runs under an advisory lock, so replicas that start together migrate
// once.
//
// # Secrets
//
// Key values are sealed with AES-256-GCM under [Options.Keyring] (see
// package store/seal); the keys table holds only the ciphertext, the
// version of the key that sealed it, a masked hint and an HMAC-SHA256
// fingerprint that keeps values unique within a service. The fingerprint is
// keyed by a random key stored sealed in the meta table, so it survives key
// rotation. A keyring is required to open a database that holds keys, and
// it must hold every key version in use: the store fails closed, never
// reading or writing plaintext. [Store.Rewrap] re-seals every value with
// the current key while the store keeps serving.
//
// # Concurrency
//
// A Store is safe for concurrent use. On SQLite the database runs in WAL
// mode with foreign keys on; writes go through a single connection (with
// BEGIN IMMEDIATE and a busy timeout for other processes), so concurrent
// writers queue instead of failing with SQLITE_BUSY, and reads use a
// separate pool. On PostgreSQL a write that fails because the server turned
// read only (SQLSTATE 25006, after a failover) drops the pooled connections
// and is retried once on a fresh one.
package sqlstore

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/base32"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" database/sql driver
	"github.com/mattn/go-sqlite3"
	"gorm.io/driver/postgres"
	"gorm.io/driver/sqlite"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/seal"
)

// ErrNoKeyring is returned when keys must be sealed or opened and
// [Options.Keyring] is nil.
var ErrNoKeyring = errors.New("sqlstore: no encryption key configured (set KEYPOOL_ENCRYPTION_KEY)")

// Options configures [Open]. The zero value is valid for a database that
// holds no keys.
type Options struct {
	// Keyring seals and opens key values. It is required to open a
	// database that already holds keys, and to create keys. It must hold
	// every key version in use; the first key seals.
	Keyring *seal.Keyring `json:"-"`
	// Logger receives operational events (migrations, failover retries,
	// rewraps); it never receives a secret. If nil, slog.Default().
	Logger *slog.Logger `json:"-"`
	// MaxOpenConns bounds the PostgreSQL pool, or the SQLite read pool
	// (SQLite always writes through one connection). If zero, 10 on
	// PostgreSQL and 4 on SQLite.
	MaxOpenConns int `json:"max_open_conns,omitempty"`
	// BusyTimeout is how long SQLite waits for a lock held by another
	// process. If zero, 10s.
	BusyTimeout time.Duration `json:"busy_timeout,omitempty"`
}

const (
	kindSQLite   = "sqlite"
	kindPostgres = "postgres"
)

// Store is a [store.Store] on SQLite or PostgreSQL. Create it with [Open];
// it is safe for concurrent use and must be closed with [Store.Close].
type Store struct {
	kind    string
	w       *gorm.DB // writes; on SQLite a single connection
	r       *gorm.DB // reads; equal to w on PostgreSQL
	wsql    *sql.DB
	rsql    *sql.DB
	maxIdle int
	keyring *seal.Keyring
	fpKey   []byte // HMAC key of key fingerprints; nil without a keyring
	log     *slog.Logger
	now     func() time.Time
	dsn     string // PostgreSQL only, for Listen's own connection; may hold a password: never log it

	usageStmts usageStmts
}

// String names the database kind only: a Store holds a DSN that may carry
// a password and the key-fingerprint HMAC key, which never print.
func (s *Store) String() string { return "sqlstore.Store{" + s.kind + "}" }

// GoString is String.
func (s *Store) GoString() string { return s.String() }

// Format prints String for every verb, so %+v and %#v cannot reveal the
// DSN or key material.
func (s *Store) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(s.String())) }

// Open opens (creating it if needed) the database named by dsn, migrates
// its schema to the latest version and checks that opts.Keyring can open
// every sealed value kind in use. See the package documentation for dsn
// forms.
func Open(ctx context.Context, dsn string, opts Options) (*Store, error) {
	return open(ctx, dsn, opts, latestVersion)
}

// open is Open migrating only up to schema version target (for tests of
// upgrades).
func open(ctx context.Context, dsn string, opts Options, target int) (*Store, error) {
	s := &Store{
		keyring: opts.Keyring,
		log:     opts.Logger,
		now:     func() time.Time { return time.Now().UTC().Truncate(time.Microsecond) },
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	cfg := &gorm.Config{
		Logger:                 logger.Discard, // gorm would log SQL with its arguments
		NowFunc:                s.now,
		SkipDefaultTransaction: true,
	}
	var err error
	switch {
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		err = s.openPostgres(dsn, opts, cfg)
	default:
		err = s.openSQLite(dsn, opts, cfg)
	}
	if err != nil {
		return nil, err
	}
	if err := s.init(ctx, target); err != nil {
		_ = s.Close()
		return nil, err
	}
	if target == latestVersion {
		// Before any write transaction: on SQLite the one writer
		// connection would be taken.
		if err := s.prepareUsage(ctx); err != nil {
			_ = s.Close()
			return nil, fmt.Errorf("sqlstore: prepare usage insert: %w", err)
		}
	}
	return s, nil
}

func (s *Store) openPostgres(dsn string, opts Options, cfg *gorm.Config) error {
	s.kind = kindPostgres
	s.dsn = dsn
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return fmt.Errorf("sqlstore: open postgres: %w", redactURLError(err))
	}
	n := opts.MaxOpenConns
	if n <= 0 {
		n = 10
	}
	db.SetMaxOpenConns(n)
	db.SetMaxIdleConns(n)
	db.SetConnMaxIdleTime(5 * time.Minute)
	s.maxIdle = n
	g, err := gorm.Open(postgres.New(postgres.Config{Conn: db}), cfg)
	if err != nil {
		_ = db.Close()
		return fmt.Errorf("sqlstore: open postgres: %w", redactURLError(err))
	}
	s.wsql, s.rsql, s.w, s.r = db, db, g, g
	return nil
}

// sqlitePath returns the file path and extra query of a SQLite dsn.
func sqlitePath(dsn string) (path, query string) {
	switch {
	case strings.HasPrefix(dsn, "sqlite://"):
		dsn = strings.TrimPrefix(dsn, "sqlite://")
	case strings.HasPrefix(dsn, "sqlite:"):
		dsn = strings.TrimPrefix(dsn, "sqlite:")
	case strings.HasPrefix(dsn, "file:"):
		dsn = strings.TrimPrefix(dsn, "file:")
	}
	path, query, _ = strings.Cut(dsn, "?")
	return path, query
}

func (s *Store) openSQLite(dsn string, opts Options, cfg *gorm.Config) error {
	s.kind = kindSQLite
	path, extra := sqlitePath(dsn)
	if path == "" || path == ":memory:" {
		return fmt.Errorf("sqlstore: sqlite needs a file path, got %q", dsn)
	}
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("sqlstore: create database directory: %w", err)
		}
	}
	busy := opts.BusyTimeout
	if busy <= 0 {
		busy = 10 * time.Second
	}
	q := url.Values{}
	q.Set("_busy_timeout", fmt.Sprint(busy.Milliseconds()))
	q.Set("_foreign_keys", "on")
	q.Set("_journal_mode", "WAL")
	q.Set("_synchronous", "NORMAL")
	q.Set("_txlock", "immediate")
	base := "file:" + path + "?"
	if extra != "" {
		base += extra + "&"
	}
	wdb, err := sql.Open("sqlite3", base+q.Encode())
	if err != nil {
		return fmt.Errorf("sqlstore: open sqlite: %w", err)
	}
	// One writer connection: writers queue in database/sql (honouring
	// their contexts) instead of failing with SQLITE_BUSY.
	wdb.SetMaxOpenConns(1)
	wdb.SetMaxIdleConns(1)
	wdb.SetConnMaxLifetime(0)
	wdb.SetConnMaxIdleTime(0)

	q.Del("_journal_mode") // set by the writer; persistent in the file
	q.Set("_txlock", "deferred")
	q.Set("_query_only", "on")
	rdb, err := sql.Open("sqlite3", base+q.Encode())
	if err != nil {
		_ = wdb.Close()
		return fmt.Errorf("sqlstore: open sqlite: %w", err)
	}
	n := opts.MaxOpenConns
	if n <= 0 {
		n = 4
	}
	rdb.SetMaxOpenConns(n)
	rdb.SetMaxIdleConns(n)
	s.maxIdle = 1

	wg, err := gorm.Open(sqlite.New(sqlite.Config{Conn: wdb}), cfg)
	if err == nil {
		s.w = wg
		s.r, err = gorm.Open(sqlite.New(sqlite.Config{Conn: rdb}), cfg)
	}
	s.wsql, s.rsql = wdb, rdb
	if err != nil {
		_ = wdb.Close()
		_ = rdb.Close()
		return fmt.Errorf("sqlstore: open sqlite: %w", err)
	}
	return nil
}

// redactURLError drops a DSN's password from a parse error.
func redactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return errors.New("invalid database URL")
	}
	return err
}

// init migrates, checks the keyring against the sealed data and loads the
// fingerprint key.
func (s *Store) init(ctx context.Context, target int) error {
	if err := s.migrateTo(ctx, target); err != nil {
		return err
	}
	var versions []int64
	if err := s.w.WithContext(ctx).Raw("SELECT DISTINCT key_version FROM keys").Scan(&versions).Error; err != nil {
		return fmt.Errorf("sqlstore: read key versions: %w", err)
	}
	if len(versions) > 0 && s.keyring == nil {
		return fmt.Errorf("sqlstore: the database holds sealed keys: %w", ErrNoKeyring)
	}
	for _, v := range versions {
		if !s.keyring.Has(seal.KeyVersion(v)) {
			return fmt.Errorf("sqlstore: keys are sealed with encryption key version %s, which the keyring (%s) lacks: %w",
				seal.KeyVersion(v), s.keyring, seal.ErrUnknownKey)
		}
	}
	if s.keyring == nil {
		return nil
	}
	return s.loadFingerprintKey(ctx)
}

const (
	metaVersion        = "version"
	metaFingerprintKey = "fingerprint_key"
)

var fingerprintKeyAD = []byte("keypool/meta/fingerprint_key")

func (s *Store) loadFingerprintKey(ctx context.Context) error {
	var sealed []byte
	err := s.write(ctx, "init fingerprint key", false, func(tx *gorm.DB) error {
		var rows [][]byte
		if err := tx.Raw("SELECT value FROM meta WHERE name = ?", metaFingerprintKey).Scan(&rows).Error; err != nil {
			return err
		}
		if len(rows) == 1 && len(rows[0]) > 0 {
			sealed = rows[0]
			return nil
		}
		k := make([]byte, 32)
		if _, err := rand.Read(k); err != nil {
			return err
		}
		v, err := s.keyring.Seal(k, fingerprintKeyAD)
		if err != nil {
			return err
		}
		// Another replica starting at the same time may insert first:
		// keep whichever row won and read it back.
		if err := tx.Exec("INSERT INTO meta (name, counter, value) VALUES (?, 0, ?) ON CONFLICT (name) DO NOTHING", metaFingerprintKey, v).Error; err != nil {
			return err
		}
		rows = nil
		if err := tx.Raw("SELECT value FROM meta WHERE name = ?", metaFingerprintKey).Scan(&rows).Error; err != nil {
			return err
		}
		if len(rows) != 1 || len(rows[0]) == 0 {
			return errors.New("fingerprint key row missing after insert")
		}
		sealed = rows[0]
		return nil
	})
	if err != nil {
		return fmt.Errorf("sqlstore: fingerprint key: %w", err)
	}
	k, err := s.keyring.Open(sealed, fingerprintKeyAD)
	if err != nil {
		return fmt.Errorf("sqlstore: open fingerprint key: %w", err)
	}
	s.fpKey = k
	return nil
}

// Ping reports whether the database answers.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.rsql.PingContext(ctx); err != nil {
		return fmt.Errorf("sqlstore: ping: %w", err)
	}
	return nil
}

// Close closes the database connections.
func (s *Store) Close() error {
	var errs []error
	for _, st := range []*sql.Stmt{s.usageStmts.chunk, s.usageStmts.one} {
		if st != nil {
			errs = append(errs, st.Close())
		}
	}
	if s.wsql != nil {
		errs = append(errs, s.wsql.Close())
	}
	if s.rsql != nil && s.rsql != s.wsql {
		errs = append(errs, s.rsql.Close())
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("sqlstore: close: %w", err)
	}
	return nil
}

// write runs fn in a write transaction. When bump is true it also bumps
// the change counter that [Store.Version] reads, in the same transaction,
// and on PostgreSQL sends a NOTIFY on [NotifyChannel] (see [Store.Listen]).
// A failure because the database is read only (a PostgreSQL failover) drops
// the pooled connections and retries once. Errors are mapped to the store
// sentinels and prefixed with op.
func (s *Store) write(ctx context.Context, op string, bump bool, fn func(tx *gorm.DB) error) error {
	run := func() error {
		return s.w.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
			if err := fn(tx); err != nil {
				return err
			}
			if bump {
				if err := tx.Exec("UPDATE meta SET counter = counter + 1 WHERE name = ?", metaVersion).Error; err != nil {
					return err
				}
				if s.kind == kindPostgres {
					// Delivered on commit only; see Listen.
					return tx.Exec("SELECT pg_notify(?, '')", NotifyChannel).Error
				}
			}
			return nil
		})
	}
	err := run()
	if isReadOnly(err) {
		s.log.WarnContext(ctx, "sqlstore: database is read only; dropping pooled connections and retrying once", "op", op)
		s.resetPool()
		err = run()
	}
	if err != nil {
		return mapErr(op, err)
	}
	return nil
}

// resetPool closes every idle connection, so the next query dials anew.
func (s *Store) resetPool() {
	s.wsql.SetMaxIdleConns(0)
	s.wsql.SetMaxIdleConns(s.maxIdle)
}

func isReadOnly(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "25006"
}

// mapErr turns database errors into store sentinels. Driver messages never
// carry a secret (only ciphertexts and fingerprints are stored), but
// constraint errors are replaced rather than wrapped to keep them short.
func mapErr(op string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrInvalid) {
		return fmt.Errorf("sqlstore: %s: %w", op, err)
	}
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return fmt.Errorf("sqlstore: %s: %w", op, store.ErrNotFound)
	}
	var se sqlite3.Error
	if errors.As(err, &se) {
		switch se.ExtendedCode {
		case sqlite3.ErrConstraintUnique, sqlite3.ErrConstraintPrimaryKey:
			return fmt.Errorf("sqlstore: %s: %w (%s)", op, store.ErrConflict, se.Error())
		case sqlite3.ErrConstraintForeignKey:
			return fmt.Errorf("sqlstore: %s: %w: a referenced record does not exist", op, store.ErrInvalid)
		case sqlite3.ErrConstraintNotNull, sqlite3.ErrConstraintCheck:
			return fmt.Errorf("sqlstore: %s: %w (%s)", op, store.ErrInvalid, se.Error())
		}
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch pe.Code {
		case "23505":
			return fmt.Errorf("sqlstore: %s: %w (%s)", op, store.ErrConflict, pe.ConstraintName)
		case "23503":
			return fmt.Errorf("sqlstore: %s: %w: a referenced record does not exist", op, store.ErrInvalid)
		case "23502", "23514":
			return fmt.Errorf("sqlstore: %s: %w (%s)", op, store.ErrInvalid, pe.Message)
		}
	}
	return fmt.Errorf("sqlstore: %s: %w", op, err)
}

var idEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// newID returns a random URL-safe id: prefix, "_", 26 base32 characters
// (128 random bits).
func newID(prefix string) string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return prefix + "_" + idEncoding.EncodeToString(b[:])
}

var _ store.Store = (*Store)(nil)
