package main

import (
	"strings"
	"testing"
)

func TestRun(t *testing.T) {
	var out strings.Builder
	if err := run(&out); err != nil {
		t.Fatal(err)
	}
	want := `free keys share the load: free-1=5 free-2=5
free keys cooling, paid serves: paid=4
free keys back: free-1=2 free-2=2
by balance left, 300:100, order bbsbbbsb: big=6 small=2
by balance left, 100:100: big=4 small=4
`
	if out.String() != want {
		t.Fatalf("output:\n%s\nwant:\n%s", out.String(), want)
	}
}
