package sqlstore

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/seal"
	"github.com/keypool/keypool/store/storetest"
)

func testKeyring(t testing.TB, hexKeys ...string) *seal.Keyring {
	t.Helper()
	if len(hexKeys) == 0 {
		k, err := seal.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		hexKeys = []string{k}
	}
	s := hexKeys[0]
	for _, k := range hexKeys[1:] {
		s += "," + k
	}
	kr, err := seal.ParseKeyring(s)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

func openAt(t testing.TB, dsn string, opts Options) *Store {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s, err := Open(context.Background(), dsn, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func sqliteDSN(t testing.TB) string {
	return "sqlite:" + filepath.Join(t.TempDir(), "keypool.db")
}

func TestSQLite(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		return openAt(t, sqliteDSN(t), Options{Keyring: testKeyring(t)})
	})
}

func TestPostgres(t *testing.T) {
	storetest.PostgresDSN(t) // skip early when unset
	storetest.Run(t, func(t *testing.T) store.Store {
		return openAt(t, storetest.PostgresDSN(t), Options{Keyring: testKeyring(t)})
	})
}

var quiet = slog.New(slog.DiscardHandler)
