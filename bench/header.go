package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// modes are the values of -mode.
var modes = []string{"throughput", "streams", "all"}

// validMode reports whether mode is one of modes.
func validMode(mode string) bool {
	for _, m := range modes {
		if m == mode {
			return true
		}
	}
	return false
}

// header is the first line of a run: only the settings of the mode run.
func header(mode string, cpus int, conns []int, d time.Duration, rounds, nStreams, waves int, metered bool, logLevel string) string {
	var parts []string
	if mode == "all" || mode == "throughput" {
		cs := make([]string, len(conns))
		for i, c := range conns {
			cs[i] = strconv.Itoa(c)
		}
		p := fmt.Sprintf("throughput at %s connection(s), %s per measurement, %d rounds (medians)", strings.Join(cs, ","), d, rounds)
		if metered {
			p += ", with and without metering"
		}
		parts = append(parts, p)
	}
	if mode == "all" || mode == "streams" {
		parts = append(parts, fmt.Sprintf("%d concurrent SSE streams, %d waves", nStreams, waves))
	}
	return fmt.Sprintf("keypool load harness: %d CPUs; %s; keypoold log level %s", cpus, strings.Join(parts, "; "), logLevel)
}
