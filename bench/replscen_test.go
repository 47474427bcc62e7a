package main

import (
	"slices"
	"testing"
	"time"
)

func TestMaxInWindow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	sec := func(f float64) time.Time { return t0.Add(time.Duration(f * float64(time.Second))) }
	// sp makes spans of 10 ms from each send time.
	sp := func(secs ...float64) []span {
		var ss []span
		for _, s := range secs {
			ss = append(ss, span{sec(s), sec(s + 0.01)})
		}
		return ss
	}
	for _, tc := range []struct {
		name string
		ss   []span
		want int
	}{
		{"empty", nil, 0},
		{"one", sp(5), 1},
		{"all in one minute, unsorted", sp(59, 0, 30), 3},
		{"a minute apart: the later answer ends after the window", sp(0, 60), 1},
		{"sliding window across a boundary", sp(0, 50, 55, 70, 109.9, 110), 4},
		{"answered late: not surely in the window", []span{{sec(0), sec(0.01)}, {sec(59), sec(60.5)}}, 1},
	} {
		if got := maxInWindow(tc.ss, time.Minute); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestModeArgsAndReplScenarios(t *testing.T) {
	for _, tc := range []struct {
		args []string
		ok   bool
		rest []string
	}{
		{[]string{"-mode", "replicas", "-short"}, true, []string{"-short"}},
		{[]string{"-short", "--mode=replicas"}, true, []string{"-short"}},
		{[]string{"-mode", "faults"}, false, nil},
		{[]string{"mode", "replicas"}, false, nil},
	} {
		rest, ok := modeArgs(tc.args, "replicas")
		if ok != tc.ok || !slices.Equal(rest, tc.rest) {
			t.Errorf("modeArgs(%q) = %q, %v; want %q, %v", tc.args, rest, ok, tc.rest, tc.ok)
		}
	}
	sel, err := selectReplScenarios("crash, burst")
	if err != nil || len(sel) != 2 || sel[0].name != "burst" || sel[1].name != "crash" {
		t.Errorf("selectReplScenarios: %v %v, want burst then crash", sel, err)
	}
	if _, err := selectReplScenarios("burst,nope"); err == nil {
		t.Error("an unknown scenario was accepted")
	}
	all, _ := selectReplScenarios("all")
	if len(all) != 6 {
		t.Errorf("all: %d scenarios, want 6", len(all))
	}
}
