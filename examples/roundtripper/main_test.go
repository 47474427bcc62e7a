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
	want := `200 {"echo":"request 1"} served by key good
200 {"echo":"request 2"} served by key good
200 {"echo":"request 3"} served by key good
key busy     cooling  sk-b…0000
key revoked  invalid  sk-r…0000
key good     active   sk-g…0000
`
	if out.String() != want {
		t.Fatalf("output:\n%s\nwant:\n%s", out.String(), want)
	}
}
