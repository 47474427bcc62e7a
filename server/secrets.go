package server

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/store/seal"
)

// resolveSecrets fills cfg.AdminToken and cfg.EncryptionKey from the data
// directory, generating each one that is missing. A generated admin token
// is written to out once, on the start that created it; later starts read
// it back from the file (mode 0600) without printing it.
func resolveSecrets(cfg *Config, out io.Writer) (generatedKey bool, err error) {
	if cfg.AdminToken.IsZero() {
		path := filepath.Join(cfg.DataDir, AdminTokenFile)
		tok, created, err := readOrCreate(path, func() (string, error) {
			t, _, _, err := auth.NewToken()
			if err != nil {
				return "", err
			}
			// An admin token, not a client token: give it its own prefix
			// so that it is never mistaken for one (and is rejected on the
			// data plane without a store lookup).
			return "kpadm_" + strings.TrimPrefix(t, auth.TokenPrefix), nil
		})
		if err != nil {
			return false, fmt.Errorf("server: admin token: %w", err)
		}
		cfg.AdminToken = keypool.Secret(tok)
		if created {
			fmt.Fprintf(out, "\n"+
				"==================================================================\n"+
				" keypoold generated an admin token. It is shown only this once:\n\n"+
				"   %s\n\n"+
				" It is kept in %s (mode 0600) so restarts keep working.\n"+
				" Set KEYPOOL_ADMIN_TOKEN to choose your own.\n"+
				"==================================================================\n\n",
				tok, path)
		}
	}
	if cfg.EncryptionKey.IsZero() && cfg.Store == nil { // a given Store seals its own secrets
		path := filepath.Join(cfg.DataDir, EncryptionKeyFile)
		key, _, err := readOrCreate(path, seal.GenerateKey)
		if err != nil {
			return false, fmt.Errorf("server: encryption key: %w", err)
		}
		cfg.EncryptionKey = keypool.Secret(key)
		generatedKey = true
		fmt.Fprintf(out, "WARNING: keypoold is using the generated encryption key in %s, beside the database.\n"+
			"WARNING: anyone who can read the database can read that key and decrypt every upstream key.\n"+
			"WARNING: for production, set KEYPOOL_ENCRYPTION_KEY (64 hex characters, e.g. `openssl rand -hex 32`)\n"+
			"WARNING: to that key's value, move the file out of the data directory, and keep it in a secret store.\n", path)
	}
	return generatedKey, nil
}

// readOrCreate returns the trimmed content of path, or creates the file
// (and its directory) with gen's value and mode 0600. It reports whether
// it created the file. Creation is exclusive, so two processes starting
// together agree on one value.
func readOrCreate(path string, gen func() (string, error)) (string, bool, error) {
	if b, err := os.ReadFile(path); err == nil {
		v := strings.TrimSpace(string(b))
		if v == "" {
			return "", false, fmt.Errorf("%s is empty", path)
		}
		return v, false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", false, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", false, err
	}
	v, err := gen()
	if err != nil {
		return "", false, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return readOrCreate(path, gen) // another process won the race
	}
	if err != nil {
		return "", false, err
	}
	if _, err := f.WriteString(v + "\n"); err != nil {
		_ = f.Close()
		return "", false, err
	}
	if err := f.Close(); err != nil {
		return "", false, err
	}
	return v, true, nil
}
