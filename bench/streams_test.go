package main

import (
	"strings"
	"testing"
	"time"
)

func TestStreamsReportComparesWallTimeFirstEventAndRSSWithTheBareProxy(t *testing.T) {
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	bare := summarize([]wave{
		{wall: ms(400), ttfe: []time.Duration{ms(20), ms(21), ms(22)}},
		{wall: ms(500), ttfe: []time.Duration{ms(20), ms(23), ms(30)}},
	}, 100<<20)
	kp := summarize([]wave{
		{wall: ms(450), ttfe: []time.Duration{ms(21), ms(22), ms(24)}, errs: 1},
		{wall: ms(630), ttfe: []time.Duration{ms(22), ms(25), ms(40)}},
	}, 150<<20)
	if bare.wall != ms(900) || kp.wall != ms(1080) || kp.errs != 1 || kp.streams != 7 {
		t.Fatalf("sums: bare %+v, keypoold %+v", bare, kp)
	}
	if bare.ttfe50 != ms(22) || kp.ttfe50 != ms(24) || kp.ttfe99 != ms(40) {
		t.Errorf("TTFE percentiles: bare p50 %v, keypoold p50 %v p99 %v", bare.ttfe50, kp.ttfe50, kp.ttfe99)
	}
	out := streamsReport(bare, kp)
	for _, want := range []string{"wall 1.200", "peak RSS 1.500", "TTFE p50 added 2.000ms", "1/7"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

func TestSequentialReportNamesWhatKeypooldAddsToTheFirstEvent(t *testing.T) {
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	bare := []time.Duration{ms(22), ms(20), ms(21), ms(30)}
	kp := []time.Duration{ms(23), ms(21), ms(22), ms(34)}
	out := sequentialReport(bare, kp, 1)
	for _, want := range []string{"p50 1.000ms", "p99 4.000ms", "(1 errors)", "22.000ms", "34.000ms"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}
