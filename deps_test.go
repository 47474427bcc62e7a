package keypool

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestRootImports keeps the root package free of stores, servers and
// database drivers: only the standard library, x/time/rate and breaker.
func TestRootImports(t *testing.T) {
	allowed := map[string]bool{
		"golang.org/x/time/rate":             true,
		"github.com/keypool/keypool/breaker": true,
		"github.com/hashicorp/golang-lru/v2": true,
	}
	files, _ := filepath.Glob("*.go")
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		af, err := parser.ParseFile(fset, f, src, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range af.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			first := strings.SplitN(path, "/", 2)[0]
			if !strings.Contains(first, ".") {
				if path == "net/http/httptest" || strings.HasPrefix(path, "database/") {
					t.Errorf("%s imports %s", f, path)
				}
				continue // standard library
			}
			if !allowed[path] {
				t.Errorf("%s imports %s; the root package may import only the standard library, x/time/rate and breaker", f, path)
			}
		}
	}
}
