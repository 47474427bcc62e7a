package deploy

import (
	"go/ast"
	"go/parser"
	"go/token"
	"strconv"
	"strings"
	"testing"
)

// serverEnvNames returns the KEYPOOL_* variables that package server reads,
// from the Env… constants of ../server/config.go, so that a misspelt
// variable in the chart or the compose file fails a test.
func serverEnvNames(t *testing.T) map[string]bool {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), "../server/config.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
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
	for _, want := range []string{"KEYPOOL_LISTEN", "KEYPOOL_DATABASE", "KEYPOOL_ADMIN_TOKEN", "KEYPOOL_ENCRYPTION_KEY", "KEYPOOL_REDIS_URL"} {
		if !names[want] {
			t.Fatalf("server/config.go has no %s constant; found %v", want, names)
		}
	}
	return names
}

// checkEnvNames fails for a KEYPOOL_* variable the server does not read.
// Others (the sign-in variables of the OIDC feature, extraEnv) pass.
func checkEnvNames(t *testing.T, where string, env []string) {
	t.Helper()
	known := serverEnvNames(t)
	for _, name := range env {
		if strings.HasPrefix(name, "KEYPOOL_") && !known[name] {
			t.Errorf("%s sets %s, which keypoold does not read", where, name)
		}
	}
}
