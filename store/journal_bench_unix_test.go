//go:build unix

package store

import (
	"syscall"
	"testing"
	"time"
)

// BenchmarkJournalAppend appends from GOMAXPROCS goroutines;
// BenchmarkJournalAppendParallel from 32 per GOMAXPROCS (64 on two
// cores), as 64 connections to keypoold do. Besides the wall time per
// append (ns/op) they report the process's CPU time per append
// (cpu-ns/op), what the journal costs a loaded keypoold, and how many
// records one write(2) carried on average (lines/write: group commit).
func BenchmarkJournalAppend(b *testing.B)         { benchJournalAppend(b, 1) }
func BenchmarkJournalAppendParallel(b *testing.B) { benchJournalAppend(b, 32) }

func benchJournalAppend(b *testing.B, parallelism int) {
	j, err := OpenJournal(JournalOptions{Dir: b.TempDir(), Logger: quietLog})
	if err != nil {
		b.Fatal(err)
	}
	defer j.Close()
	r := jrec(1)
	r.ID = "0123456789abcdef-1a2b"
	r.RequestID = "0123456789ab0123456789ab"
	r.TeamID, r.TokenID = "team_0123456789abcdef", "tok_0123456789abcdef"
	b.ReportAllocs()
	b.SetParallelism(parallelism)
	cpu0 := processCPU()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			rr := r
			if err := j.Append(&rr); err != nil {
				b.Error(err)
				return
			}
			j.Done(rr.seg, 1)
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
	j.mu.Lock()
	b.ReportMetric(float64(j.lines)/float64(max(j.groups, 1)), "lines/write")
	j.mu.Unlock()
}

// processCPU returns the user and system CPU time of the process.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
