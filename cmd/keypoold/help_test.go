package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/server"
)

// runArgs runs keypoold with args in an empty directory and environment.
func runArgs(t *testing.T, e map[string]string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(context.Background(), args, mapEnv(e), strings.NewReader(""), &out, &errb)
	return code, out.String(), errb.String()
}

func TestTopLevelHelp(t *testing.T) {
	t.Chdir(t.TempDir())
	for _, arg := range []string{"-h", "--help", "-help", "help"} {
		code, out, errs := runArgs(t, nil, arg)
		if code != 0 || errs != "" {
			t.Errorf("keypoold %s: exit %d, stderr %q", arg, code, errs)
		}
		for _, want := range []string{"service", "key", "team", "user", "token", "usage", "health",
			"-database", "-listen", "-config", "KEYPOOL_ADMIN_TOKEN", "KEYPOOL_ENCRYPTION_KEY", "KEYPOOL_URL"} {
			if !strings.Contains(out, want) {
				t.Errorf("keypoold %s: no %q in\n%s", arg, want, out)
			}
		}
		if strings.Contains(out, "Usage of keypoold serve") {
			t.Errorf("keypoold %s printed only the serve flags", arg)
		}
	}
	code, out, _ := runArgs(t, nil, "serve", "-h")
	if code != 0 || !strings.Contains(out, "-database") {
		t.Errorf("keypoold serve -h: exit %d %q", code, out)
	}
}

func TestCommandHelp(t *testing.T) {
	t.Chdir(t.TempDir()) // no ./data/admin_token: help needs no server
	groups := map[string]string{
		"service": "add|list|get|set|delete", "key": "add|import|list|delete|enable|disable", "team": "add|list|set",
		"user": "add|list", "token": "create|list|revoke|set", "tier": "add|list|get|set|delete",
	}
	for noun, verbs := range groups {
		code, _, errs := runArgs(t, nil, noun)
		if want := "keypoold " + noun + ": missing subcommand (" + verbs + ")"; code != 2 || !strings.HasPrefix(errs, want+"\n") {
			t.Errorf("keypoold %s: exit %d, stderr %q, want %q", noun, code, errs, want)
		}
		for _, h := range [][]string{{noun, "-h"}, {noun, "--help"}, {noun, "help"}, {"help", noun}} {
			code, out, errs := runArgs(t, nil, h...)
			if code != 0 || errs != "" {
				t.Errorf("keypoold %s: exit %d, stderr %q", strings.Join(h, " "), code, errs)
			}
			for _, v := range strings.Split(verbs, "|") {
				if !strings.Contains(out, "  "+v+" ") {
					t.Errorf("keypoold %s: subcommand %q not listed:\n%s", strings.Join(h, " "), v, out)
				}
			}
		}
	}
	code, _, errs := runArgs(t, nil, "key", "frob")
	if code != 2 || !strings.Contains(errs, `keypoold key: unknown subcommand "frob" (add|import|list|delete|enable|disable)`) {
		t.Errorf("key frob: exit %d %q", code, errs)
	}
	code, _, errs = runArgs(t, nil, "keys")
	if code != 2 || !strings.Contains(errs, "keypoold key: missing subcommand") {
		t.Errorf("keys: exit %d %q", code, errs)
	}
	code, _, errs = runArgs(t, nil, "frobnicate")
	if code != 2 || !strings.HasPrefix(errs, `keypoold: unknown command "frobnicate"`) {
		t.Errorf("frobnicate: exit %d %q", code, errs)
	}

	code, out, _ := runArgs(t, nil, "health", "-h")
	if code != 0 || !strings.HasPrefix(out, "Usage: keypoold health\n") {
		t.Errorf("health -h: exit %d %q", code, out)
	}
	code, out, _ = runArgs(t, nil, "usage", "-h")
	if code != 0 || !strings.Contains(out, "-group-by") {
		t.Errorf("usage -h: exit %d %q", code, out)
	}
	for _, args := range [][]string{{"service", "get", "-h"}, {"key", "delete", "-h"}, {"token", "revoke", "-h"}, {"key", "add", "-h"}} {
		code, out, errs := runArgs(t, nil, args...)
		if code != 0 || errs != "" || !strings.HasPrefix(out, "Usage: keypoold "+args[0]+" "+args[1]) {
			t.Errorf("%v: exit %d %q %q", args, code, out, errs)
		}
	}
	code, _, errs = runArgs(t, nil, "key", "delete")
	if code != 2 || !strings.Contains(errs, "keypoold key delete: want one argument") {
		t.Errorf("key delete: exit %d %q", code, errs)
	}
	code, _, errs = runArgs(t, nil, "key", "list", "--nope")
	if code != 2 || !strings.Contains(errs, "keypoold key list: flag provided but not defined: -nope") {
		t.Errorf("key list --nope: exit %d %q", code, errs)
	}
	// Without -h, a command needs the admin token.
	code, _, errs = runArgs(t, nil, "key", "list")
	if code != 1 || !strings.Contains(errs, "KEYPOOL_ADMIN_TOKEN") {
		t.Errorf("key list without a token: exit %d %q", code, errs)
	}
}

func TestServiceAddHelpNames(t *testing.T) {
	_, out, _ := runArgs(t, nil, "service", "add", "-h")
	names := append(append(append([]string{}, keypool.AuthSchemeNames...), "header:<Name>", "query:<name>"), keypool.SelectorNames...)
	for _, n := range names {
		if !strings.Contains(out, n) {
			t.Errorf("service add -h does not list %q:\n%s", n, out)
		}
	}
}

func TestDatabaseChecked(t *testing.T) {
	for _, c := range []struct {
		db, ext string
		wantErr string
	}{
		{db: "sqlite:./data/k.db"},
		{db: "sqlite:///tmp/k.db"},
		{db: "file:k.db?_pragma=x"},
		{db: "./k.db"},
		{db: "/var/lib/keypool/k.db"},
		{db: "postgres://u:pw@db/keypool"},
		{db: "postgresql://u@db/keypool"},
		{db: "mysql://u:pw@db/keypool", wantErr: `unsupported scheme "mysql"`},
		{db: "POSTGRES://db/keypool", wantErr: "lower case"},
		{db: "redis://localhost", wantErr: `unsupported scheme "redis"`},
		{ext: "sqlite:ext.db"},
		{ext: "postgres://db/creds"},
		{ext: "mysql://db/creds", wantErr: "external database"},
		{ext: "creds.db", wantErr: "external database"},
	} {
		var args []string
		if c.db != "" {
			args = append(args, "-database", c.db)
		}
		if c.ext != "" {
			args = append(args, "-external-database", c.ext)
		}
		_, err := loadConfig(args, mapEnv(nil), io.Discard)
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%v: %v", args, err)
		case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("%v: error %v, want %q", args, err, c.wantErr)
		case err != nil && strings.Contains(err.Error(), "pw"):
			t.Errorf("%v: password in %v", args, err)
		}
	}
	// From the environment too, and keypoold exits before serving.
	code, _, errs := runArgs(t, map[string]string{server.EnvDatabase: "mysql://x"})
	if code != 1 || !strings.Contains(errs, "mysql") {
		t.Errorf("KEYPOOL_DATABASE=mysql://x: exit %d %q", code, errs)
	}
}

func TestImportConflictLines(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusConflict)
		_, _ = io.WriteString(w, `{"error":{"message":"2 of the import's lines were rejected","type":"invalid_request_error","code":"conflict"},`+
			`"lines":[{"line":1,"code":"conflict","message":"key already stored (id k1)"},{"line":3,"code":"conflict","message":"same key as line 1"}]}`)
	}))
	defer srv.Close()
	e := map[string]string{envURL: srv.URL, server.EnvAdminToken: "kpadm_x"}
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"key", "import", "--service", "openai"}, mapEnv(e), strings.NewReader("a\nb\na\n"), &out, &errb)
	want := "409 conflict: 2 of the import's lines were rejected\n  line 1: conflict: key already stored (id k1)\n  line 3: conflict: same key as line 1\n"
	if code != 1 || !strings.HasSuffix(errb.String(), want) {
		t.Errorf("exit %d, stderr %q, want suffix %q", code, errb.String(), want)
	}
}
