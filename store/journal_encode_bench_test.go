//go:build unix

package store

import (
	"testing"
	"time"
)

// BenchmarkJournalEncode encodes a request's two lines, its provisional
// record and the delta of its final record, as keypoold journals them.
func BenchmarkJournalEncode(b *testing.B) {
	rec := UsageRecord{Time: time.Now(), ID: "0123456789abcdef-1a2b", RequestID: "0123456789ab0123456789ab", TeamID: "team_0123456789abcdef",
		TokenID: "tok_0123456789abcdef", Service: "bench", KeyID: "key_0123456789abcdef", Model: "gpt-4o-mini",
		TokensIn: 1000, TokensOut: 1024, Cost: 0.00213, KeySpend: KeySpendByUnit}
	b.ReportAllocs()
	cpu0 := processCPU()
	var buf [2 * lineBufSize]byte
	n := 0
	for b.Loop() {
		r := rec
		line := appendUnsummedLine(buf[:0], &r, lineProvisional)
		r.pseg = 1
		r.prov = provStrings{requestID: r.RequestID, teamID: r.TeamID, tokenID: r.TokenID, service: r.Service, keyID: r.KeyID, model: r.Model}
		r.Time = r.Time.Add(time.Second)
		r.Status, r.TokensIn, r.TokensOut, r.Cost, r.LatencyMS, r.KeySpend = 200, 12, 34, 0.0000413, 900, 0.0000413
		line = appendUnsummedLine(line, &r, lineDelta)
		n = len(line)
	}
	b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
	b.ReportMetric(float64(n), "bytes/request")
}
