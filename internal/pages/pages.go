// Package pages parses the server-rendered HTML pages that the console
// and the sign-in pages embed: one layout and one template per page.
package pages

import (
	"fmt"
	"html/template"
	"io/fs"
	"strings"
)

// Parse reads templates/layout.html and every other templates/*.html of
// fsys, and returns each page (by file name without ".html") as a clone
// of the layout with the page's templates added, ready to execute
// "layout.html". owner prefixes the error of a template that does not
// parse.
func Parse(fsys fs.FS, funcs template.FuncMap, owner string) (map[string]*template.Template, error) {
	layout, err := template.New("layout.html").Funcs(funcs).ParseFS(fsys, "templates/layout.html")
	if err != nil {
		return nil, err
	}
	files, err := fs.Glob(fsys, "templates/*.html")
	if err != nil {
		return nil, err
	}
	pages := map[string]*template.Template{}
	for _, f := range files {
		name := strings.TrimSuffix(strings.TrimPrefix(f, "templates/"), ".html")
		if name == "layout" {
			continue
		}
		clone, err := layout.Clone()
		if err != nil {
			return nil, err
		}
		t, err := clone.ParseFS(fsys, f)
		if err != nil {
			return nil, fmt.Errorf("%s: template %s: %w", owner, f, err)
		}
		pages[name] = t
	}
	return pages, nil
}
