package main

import (
	"fmt"
	"time"
)

// printConns prints one connection count's table: each proxy's medians
// over rounds and keypoold's ratios to the bare proxy (and, when measured,
// metered to unmetered and router to direct).
func printConns(c int, rb, rk, rm, rr, rd []result) {
	get := func(rs []result, f func(result) float64) float64 {
		xs := make([]float64, len(rs))
		for i, r := range rs {
			xs[i] = f(r)
		}
		return median(xs)
	}
	rps := func(r result) float64 { return r.rps }
	p50 := func(r result) float64 { return float64(r.p50) }
	p99 := func(r result) float64 { return float64(r.p99) }
	cpu := func(r result) float64 { return float64(r.cpuPerReq) }
	errs := func(r result) float64 { return float64(r.errs) }
	fmt.Printf("== %d connection(s)\n", c)
	fmt.Printf("%-9s %10s %10s %10s %12s %6s\n", "", "req/s", "p50", "p99", "cpu/req", "errors")
	row := func(name string, rs []result) {
		fmt.Printf("%-9s %10.0f %10s %10s %12s %6.0f\n", name, get(rs, rps), ms(time.Duration(get(rs, p50))),
			ms(time.Duration(get(rs, p99))), time.Duration(get(rs, cpu)).Round(100*time.Nanosecond), get(rs, errs))
	}
	if len(rd) > 0 {
		row("direct", rd)
	}
	row("bare", rb)
	row("keypoold", rk)
	if len(rm) > 0 {
		row("kp+meter", rm)
	}
	if len(rr) > 0 {
		row("kp+router", rr)
	}
	fmt.Printf("ratio keypoold/bare: throughput %.3f, cpu/req %.3f", get(rk, rps)/get(rb, rps), get(rk, cpu)/get(rb, cpu))
	if len(rm) > 0 {
		fmt.Printf("\nratio metered/unmetered keypoold: throughput %.3f, cpu/req %.3f", get(rm, rps)/get(rk, rps), get(rm, cpu)/get(rk, cpu))
	}
	if len(rr) > 0 {
		fmt.Printf("\nratio router/direct (both metered): throughput %.3f, cpu/req %.3f (router adds %+.1f%% CPU per request)",
			get(rr, rps)/get(rm, rps), get(rr, cpu)/get(rm, cpu), 100*(get(rr, cpu)/get(rm, cpu)-1))
	}
	if len(rd) > 0 {
		addB := get(rb, p50) - get(rd, p50)
		addK := get(rk, p50) - get(rd, p50)
		fmt.Printf(", added p50 over direct: bare %s keypoold %s (ratio %.3f)", ms(time.Duration(addB)), ms(time.Duration(addK)), addK/addB)
	}
	fmt.Print("\n\n")
}
