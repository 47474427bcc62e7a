package deploy

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// serverEnvNames returns the environment variables that package server
// reads: the string values of its Env… constants in every non-test file
// of ../server (config.go, oidc.go, adminusers.go, …), so that a misspelt
// variable in the chart or the compose file fails a test.
func serverEnvNames(t *testing.T) map[string]bool {
	t.Helper()
	files, err := filepath.Glob("../server/*.go")
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	fset := token.NewFileSet()
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			vs, ok := n.(*ast.ValueSpec)
			if !ok {
				return true
			}
			for i, id := range vs.Names {
				if !strings.HasPrefix(id.Name, "Env") || i >= len(vs.Values) {
					continue
				}
				if lit, ok := vs.Values[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
					v, _ := strconv.Unquote(lit.Value)
					names[v] = true
				}
			}
			return true
		})
	}
	for _, want := range []string{"KEYPOOL_LISTEN", "KEYPOOL_DATABASE", "KEYPOOL_ADMIN_TOKEN", "KEYPOOL_ENCRYPTION_KEY",
		"KEYPOOL_REDIS_URL", "GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET", "AUTH_BASE_URL", "KEYPOOL_OIDC_STATE_SECRET"} {
		if !names[want] {
			t.Fatalf("package server has no constant for %s; found %v", want, names)
		}
	}
	return names
}

// notServerEnv are variables the deployment files set for something else
// than package server: Go's and SQLite's temporary directory.
var notServerEnv = map[string]bool{"TMPDIR": true}

// checkEnvNames fails for a variable keypoold does not read. extra names
// variables passed on purpose for something else (the chart's extraEnv,
// referenced from the YAML config).
func checkEnvNames(t *testing.T, where string, env []string, extra ...string) {
	t.Helper()
	known := serverEnvNames(t)
	for _, name := range env {
		if !known[name] && !notServerEnv[name] && !slices.Contains(extra, name) {
			t.Errorf("%s sets %s, which keypoold does not read", where, name)
		}
	}
}
