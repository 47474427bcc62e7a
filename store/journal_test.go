package store

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// idStore is an appender that keeps one record per ID, as the SQL store
// does, and counts what it was offered.
type idStore struct {
	mu      sync.Mutex
	byID    map[string]UsageRecord
	offered int
	fail    bool
}

func newIDStore() *idStore { return &idStore{byID: map[string]UsageRecord{}} }

func (s *idStore) AppendUsage(_ context.Context, recs []UsageRecord) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail {
		return fmt.Errorf("store down")
	}
	s.offered += len(recs)
	for _, r := range recs {
		if _, ok := s.byID[r.ID]; !ok {
			s.byID[r.ID] = r
		}
	}
	return nil
}

func (s *idStore) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byID)
}

var quietLog = slog.New(slog.DiscardHandler)

func openTestJournal(t *testing.T, dir string, segBytes int64) *Journal {
	t.Helper()
	j, err := OpenJournal(JournalOptions{Dir: dir, SegmentBytes: segBytes, SyncInterval: -1, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// crash abandons j as a killed process would: files stay, the lock is
// released (the kernel drops a dead process's flocks).
func (j *Journal) crash() {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.closed = true
	// Files stay as they are (mapped pages belong to the kernel now).
	_ = j.lock.Close()
}

func journalFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// readRecords calls fn with the ID (and what else the line has) of every
// intact line of a segment file, whatever its kind.
func readRecords(path string, fn func(UsageRecord)) (torn int, err error) {
	return readSegment(path, func(body []byte, kind, format int) bool {
		var r UsageRecord
		if kind == lineDelta {
			id, ok := lineID(body, format)
			r.ID = id
			if !ok {
				return false
			}
		} else if !decodeLine(body, kind, format, &r) {
			return false
		}
		fn(r)
		return true
	})
}

func jrec(i int) UsageRecord {
	return UsageRecord{Time: time.Date(2025, 3, 10, 12, 0, 0, 0, time.UTC), ID: fmt.Sprintf("r%05d", i),
		Service: "svc", KeyID: "key_1", Model: "gpt-4o-mini\n\"quoted\"", Status: 200, TokensIn: int64(i), KeySpend: 0.5}
}

func TestJournalDoneDeletesFiles(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, 4096)
	recs := make([]UsageRecord, 200)
	for i := range recs {
		recs[i] = jrec(i)
		if err := j.Append(&recs[i]); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(j.segs); n < 3 {
		t.Fatalf("%d segments for 200 records of ~200 bytes at 4 KiB each, want rotation", n)
	}
	for i := range recs {
		j.Done(recs[i].seg, 1)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if names := journalFiles(t, dir); len(names) != 0 {
		t.Fatalf("files left after every record was done: %v", names)
	}
}

// TestJournalReplayAfterCrash: a process appends records, the store gets
// some of them, the process dies; the next process replays the rest
// (and, harmlessly, the stored ones again), exactly once each, and
// deletes the dead journal.
func TestJournalReplayAfterCrash(t *testing.T) {
	dir := t.TempDir()
	st := newIDStore()
	dead := openTestJournal(t, dir, 4096)
	for i := range 300 {
		r := jrec(i)
		if err := dead.Append(&r); err != nil {
			t.Fatal(err)
		}
		if i < 120 { // flushed to the store before the crash
			_ = st.AppendUsage(context.Background(), []UsageRecord{r})
			dead.Done(r.seg, 1)
		}
	}
	dead.crash()

	live := openTestJournal(t, dir, 4096)
	defer live.Close()
	// A journal whose process is alive is not touched.
	alive := openTestJournal(t, dir, 4096)
	r := jrec(999)
	if err := alive.Append(&r); err != nil {
		t.Fatal(err)
	}
	stats, err := live.ReplayOrphans(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	if st.len() != 300 || stats.Journals != 1 || stats.Torn != 0 {
		t.Fatalf("after replay: %d records stored, stats %+v; want 300, one journal", st.len(), stats)
	}
	got := st.byID["r00007"]
	if want := jrec(7); got.Model != want.Model || got.KeySpend != 0.5 || !got.Time.Equal(want.Time) {
		t.Fatalf("replayed record differs: %+v", got)
	}
	for _, name := range journalFiles(t, dir) {
		if strings.Contains(name, dead.inst) {
			t.Errorf("dead journal file left: %s", name)
		}
	}
	// A stale lock file without segments (a process that died with
	// everything stored) is cleaned up; a live one is not.
	stale := filepath.Join(dir, journalPrefix+"00000000deadbeef"+journalLock)
	if err := os.WriteFile(stale, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// A second replay finds nothing.
	if stats, err := live.ReplayOrphans(context.Background(), st); err != nil || stats.Records != 0 {
		t.Fatalf("second replay: %+v %v", stats, err)
	}
	if _, ok := st.byID["r00999"]; ok {
		t.Fatal("the live journal was replayed")
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale lock file not removed: %v", err)
	}
	if _, err := os.Stat(alive.lock.Name()); err != nil {
		t.Errorf("a live journal's lock file was removed: %v", err)
	}
	if err := alive.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestJournalTornLines: a torn last line (the process died mid-write) and
// a corrupted line are skipped and counted; the intact records replay.
func TestJournalTornLines(t *testing.T) {
	dir := t.TempDir()
	var b []byte
	for i := range 5 {
		r := jrec(i)
		line, err := encodeRecord(&r)
		if err != nil {
			t.Fatal(err)
		}
		if i == 2 {
			line[20] ^= 0x01 // flipped bit: checksum fails
		}
		b = append(b, line...)
	}
	last, _ := encodeRecord(&UsageRecord{ID: "torn", Service: "svc"})
	b = append(b, last[:len(last)/2]...) // cut short, no newline
	if err := os.WriteFile(filepath.Join(dir, "usage-0123456789abcdef-00000001.log"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	st := newIDStore()
	j := openTestJournal(t, dir, 0)
	defer j.Close()
	stats, err := j.ReplayOrphans(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	if st.len() != 4 || stats.Torn != 2 || stats.Records != 4 {
		t.Fatalf("stored %d, stats %+v; want 4 records and 2 torn lines", st.len(), stats)
	}
	if _, ok := st.byID["r00002"]; ok {
		t.Fatal("the corrupted line was replayed")
	}
}

// TestJournalReplayFailureKeepsFiles: a store that fails leaves the dead
// journal in place for the next attempt.
func TestJournalReplayFailureKeepsFiles(t *testing.T) {
	dir := t.TempDir()
	dead := openTestJournal(t, dir, 0)
	r := jrec(1)
	_ = dead.Append(&r)
	dead.crash()
	st := newIDStore()
	st.fail = true
	j := openTestJournal(t, dir, 0)
	defer j.Close()
	if _, err := j.ReplayOrphans(context.Background(), st); err == nil {
		t.Fatal("replay into a failing store reported no error")
	}
	st.fail = false
	if stats, err := j.ReplayOrphans(context.Background(), st); err != nil || st.len() != 1 || stats.Journals != 1 {
		t.Fatalf("retry: %+v %v, %d stored", stats, err, st.len())
	}
}

// TestUsageWriterJournal: records added through a writer with a journal
// are in the journal before Add returns, and the journal is emptied as
// the store takes them.
func TestUsageWriterJournal(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, 1024)
	st := newIDStore()
	ticks := make(chan time.Time)
	w := newUsageWriter(st, UsageWriterOptions{Journal: j, Retention: -1}, ticks, time.Now)
	for i := range 50 {
		w.Add(UsageRecord{Service: "svc", TokensIn: int64(i)})
	}
	// Not flushed yet: a crash now would find all 50 in the journal.
	n := 0
	for _, name := range journalFiles(t, dir) {
		if strings.HasSuffix(name, journalExt) {
			torn, err := readRecords(filepath.Join(dir, name), func(r UsageRecord) {
				if r.ID == "" {
					t.Error("journaled record without an id")
				}
				n++
			})
			if err != nil || torn != 0 {
				t.Fatal(err, torn)
			}
		}
	}
	if n != 50 {
		t.Fatalf("%d records in the journal before any flush, want 50", n)
	}
	if err := w.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st.len() != 50 {
		t.Fatalf("store has %d", st.len())
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if names := journalFiles(t, dir); len(names) != 0 {
		t.Fatalf("journal not emptied: %v", names)
	}
}

// TestJournalLineRoundTrip: the hand-written encoding decodes with
// encoding/json to the same record, tricky strings included.
func TestJournalLineRoundTrip(t *testing.T) {
	for _, r := range []UsageRecord{
		jrec(3),
		{Time: time.Date(2025, 1, 2, 3, 4, 5, 6789, time.FixedZone("x", 3600)), ID: "a", Model: "m\x00\x1f\t\r\n\"\\/<>&\u2028é\xff", Cost: 1.5e-7, KeySpend: 3, Status: 499, LatencyMS: -1},
		{Service: "svc", Cost: math.NaN()},
	} {
		line := appendRecordLine(nil, &r, lineFinal)
		got, _, ok := decodeRecord(line)
		if !ok {
			t.Fatalf("line does not decode: %s", line)
		}
		want := r
		if math.IsNaN(want.Cost) {
			want.Cost = 0
		}
		want.Model = strings.ToValidUTF8(want.Model, "\uFFFD")
		if !got.Time.Equal(want.Time) {
			t.Errorf("time %v, want %v", got.Time, want.Time)
		}
		got.Time, want.Time = time.Time{}, time.Time{}
		if got != want {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, want)
		}
	}
}

// TestJournalProvisional: a request whose answer arrived but whose final
// record was never written replays as its provisional record; one whose
// final record was written replays as that, once; and provisional lines
// do not keep files alive once superseded.
func TestJournalProvisional(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, 0)
	st := newIDStore()
	w := newUsageWriter(st, UsageWriterOptions{Journal: j, Retention: -1}, make(chan time.Time), time.Now)
	cut := UsageRecord{Service: "svc", KeyID: "k", Status: 200, TokensIn: 1000} // the estimate
	w.Provisional(&cut)
	done := UsageRecord{Service: "svc", KeyID: "k", Status: 200, TokensIn: 1000}
	w.Provisional(&done)
	done.TokensIn = 12 // metered
	w.Add(done)
	j.crash() // before any flush
	live := openTestJournal(t, dir, 0)
	defer live.Close()
	if _, err := live.ReplayOrphans(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	if st.len() != 2 || st.byID[cut.ID].TokensIn != 1000 || st.byID[done.ID].TokensIn != 12 || st.offered != 2 {
		t.Fatalf("replayed %d (offered %d): %+v", st.len(), st.offered, st.byID)
	}

	// Superseded provisional lines are done: a clean close leaves nothing.
	dir2 := t.TempDir()
	j2 := openTestJournal(t, dir2, 0)
	w2 := newUsageWriter(newIDStore(), UsageWriterOptions{Journal: j2, Retention: -1}, make(chan time.Time), time.Now)
	for range 10 {
		r := UsageRecord{Service: "svc"}
		w2.Provisional(&r)
		w2.Add(r)
	}
	if err := w2.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := j2.Close(); err != nil {
		t.Fatal(err)
	}
	if names := journalFiles(t, dir2); len(names) != 0 {
		t.Fatalf("files left: %v", names)
	}
}

// TestJournalConcurrentAppendsReplayOnce: hundreds of goroutines journal
// requests (a provisional line, sometimes a retry's second one, then the
// final record) through a writer whose store takes batches meanwhile,
// while small segments rotate and stored ones are deleted; then the store
// goes down and the process dies. The replay leaves every request in the
// store exactly once, with its final record.
func TestJournalConcurrentAppendsReplayOnce(t *testing.T) {
	const goroutines, perG = 300, 20
	dir := t.TempDir()
	j := openTestJournal(t, dir, 2048) // a segment per ~8 lines
	st := newIDStore()
	w := newUsageWriter(st, UsageWriterOptions{Journal: j, Retention: -1, BatchSize: 64}, make(chan time.Time), time.Now)
	ids := make([][]string, goroutines)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perG {
				rec := UsageRecord{Service: "svc", KeyID: "k", TokensIn: 1000} // the estimate
				w.Provisional(&rec)
				if i%3 == 0 {
					w.Provisional(&rec) // a retry on another key
				}
				rec.Status, rec.TokensIn, rec.TokensOut = 200, int64(g), int64(i) // metered
				ids[g] = append(ids[g], rec.ID)
				w.Add(rec)
			}
		}()
	}
	wg.Wait()
	if st.len() == 0 {
		t.Fatal("the store took no batch while the goroutines ran; the test does not exercise deletion")
	}
	st.mu.Lock()
	st.fail = true // the rest never reaches the store before the crash
	st.mu.Unlock()
	_ = w.Close(context.Background())
	j.crash()

	st.mu.Lock()
	st.fail = false
	st.mu.Unlock()
	live := openTestJournal(t, dir, 0)
	defer live.Close()
	stats, err := live.ReplayOrphans(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	if stats.Torn != 0 {
		t.Errorf("%d torn lines without a torn write", stats.Torn)
	}
	if n := st.len(); n != goroutines*perG {
		t.Fatalf("store has %d records after the replay, want %d", n, goroutines*perG)
	}
	for g, gids := range ids {
		for i, id := range gids {
			r, ok := st.byID[id]
			if !ok || r.Status != 200 || r.TokensIn != int64(g) || r.TokensOut != int64(i) {
				t.Fatalf("request %d/%d: stored %+v (present %v), want its final record", g, i, r, ok)
			}
		}
	}
}

// TestJournalCloseWritesAcceptedRecords: Close during concurrent appends
// returns after every record whose Append succeeded is in a file, and
// later appends fail with ErrJournalClosed.
func TestJournalCloseWritesAcceptedRecords(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, 4096)
	var accepted sync.Map
	var n0 atomic.Int64
	var wg sync.WaitGroup
	for g := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				r := jrec(g*100000 + i)
				if err := j.Append(&r); err != nil {
					if err != ErrJournalClosed {
						t.Errorf("append: %v", err)
					}
					return
				}
				accepted.Store(r.ID, true)
				n0.Add(1)
			}
		}()
	}
	for n0.Load() < 2000 { // close in the middle of the appends
		runtime.Gosched()
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	onDisk := map[string]int{}
	for _, name := range journalFiles(t, dir) {
		if !strings.HasSuffix(name, journalExt) {
			continue
		}
		torn, err := readRecords(filepath.Join(dir, name), func(r UsageRecord) {
			onDisk[r.ID]++
		})
		if err != nil || torn != 0 {
			t.Fatalf("%s: %v, %d torn", name, err, torn)
		}
	}
	n := 0
	accepted.Range(func(k, _ any) bool {
		n++
		if onDisk[k.(string)] != 1 {
			t.Errorf("accepted record %s is %d times on disk", k, onDisk[k.(string)])
		}
		return true
	})
	if n == 0 || len(onDisk) != n {
		t.Fatalf("%d records accepted, %d on disk", n, len(onDisk))
	}
}

// TestJournalReplaysPreviousFormat: journals written in format 1 (JSON
// lines) replay as they did: before final records became deltas (each
// final line whole, superseding its provisional line) and after (a "D"
// line changing its provisional line). A finished request replays as its
// final record, one that did not finish as its provisional record; a
// format-2 journal in the same directory replays alongside.
func TestJournalReplaysPreviousFormat(t *testing.T) {
	dir := t.TempDir()
	const old = `1f364222 P{"time":"2026-12-01T10:00:00Z","id":"0123456789abcdef-1","request_id":"req1","team_id":"team_a","token_id":"tok_a","service":"svc","key_id":"key_1","model":"gpt-4o-mini","status":0,"tokens_in":1000,"tokens_out":1024,"cached_tokens":0,"cost":0.5,"latency_ms":0,"key_spend":-1}
fefd662a {"time":"2026-12-01T10:00:01Z","id":"0123456789abcdef-1","request_id":"req1","team_id":"team_a","token_id":"tok_a","service":"svc","key_id":"key_1","model":"gpt-4o-mini","status":200,"tokens_in":12,"tokens_out":34,"cached_tokens":0,"cost":0.001,"latency_ms":900,"key_spend":0.001}
afa8d003 P{"time":"2026-12-01T10:00:01Z","id":"0123456789abcdef-2","request_id":"req2","team_id":"team_a","token_id":"tok_a","service":"svc","key_id":"key_2","model":"gpt-4o-mini","status":0,"tokens_in":1000,"tokens_out":1024,"cached_tokens":0,"cost":0.5,"latency_ms":0,"key_spend":-1}
06b58d65 P{"time":"2026-12-01T10:00:02Z","id":"0123456789abcdef-3","request_id":"req3","team_id":"team_a","token_id":"tok_a","service":"svc","key_id":"key_3","model":"gpt-4o","tokens_in":1000,"tokens_out":1024,"cost":0.5,"key_spend":-1}
be48349f D{"time":"2026-12-01T10:00:03Z","id":"0123456789abcdef-3","model":"gpt-4o-2024-08-06","status":200,"tokens_in":56,"tokens_out":78,"cached_tokens":0,"cost":0.002,"latency_ms":700,"key_spend":0.002}
`
	if err := os.WriteFile(filepath.Join(dir, "usage-0123456789abcdef-00000001.log"), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	// A format-2 journal of another dead process.
	j := openTestJournal(t, dir, 0)
	now := UsageRecord{Time: time.Date(2026, 12, 1, 11, 0, 0, 0, time.UTC), ID: "fedcba9876543210-1", Service: "svc", KeyID: "key_4", TokensIn: 1000}
	if err := j.AppendProvisional(&now); err != nil {
		t.Fatal(err)
	}
	now.Status, now.TokensIn = 200, 9
	if err := j.Append(&now); err != nil {
		t.Fatal(err)
	}
	j.crash()

	live := openTestJournal(t, dir, 0)
	defer live.Close()
	st := newIDStore()
	stats, err := live.ReplayOrphans(context.Background(), st)
	if err != nil || stats.Torn != 0 || stats.Records != 4 || stats.Journals != 2 {
		t.Fatalf("replay: %+v, %v", stats, err)
	}
	done, cut, delta := st.byID["0123456789abcdef-1"], st.byID["0123456789abcdef-2"], st.byID["0123456789abcdef-3"]
	if done.Status != 200 || done.TokensIn != 12 || done.TokensOut != 34 || done.KeySpend != 0.001 || done.LatencyMS != 900 ||
		done.TeamID != "team_a" || done.RequestID != "req1" || done.Model != "gpt-4o-mini" {
		t.Errorf("finished request replayed as %+v", done)
	}
	if cut.Status != 0 || cut.TokensIn != 1000 || cut.KeySpend != KeySpendByUnit || cut.KeyID != "key_2" {
		t.Errorf("unfinished request replayed as %+v", cut)
	}
	if delta.Status != 200 || delta.TokensIn != 56 || delta.TokensOut != 78 || delta.Cost != 0.002 || delta.KeySpend != 0.002 ||
		delta.LatencyMS != 700 || delta.Model != "gpt-4o-2024-08-06" || delta.KeyID != "key_3" || delta.RequestID != "req3" ||
		!delta.Time.Equal(time.Date(2026, 12, 1, 10, 0, 3, 0, time.UTC)) {
		t.Errorf("request with a delta replayed as %+v", delta)
	}
	if got := st.byID["fedcba9876543210-1"]; got.Status != 200 || got.TokensIn != 9 || got.KeyID != "key_4" || !got.Time.Equal(now.Time) {
		t.Errorf("format-2 request replayed as %+v", got)
	}
	for _, name := range journalFiles(t, dir) {
		if !strings.HasPrefix(name, "usage-"+live.Instance()) {
			t.Errorf("%s kept after its replay", name)
		}
	}
}

// TestJournalLineFormat pins format 2 byte for byte: a provisional
// line, the delta of its final record (the model changed, a token
// cleared) and a whole final line, with escaped strings; and that each
// decodes to its record.
func TestJournalLineFormat(t *testing.T) {
	rec := UsageRecord{Time: time.Unix(1764583200, 123456789), ID: "0123456789abcdef-1", RequestID: `req\1`, TeamID: "team_a",
		TokenID: "tok_a", Service: "svc", KeyID: "key_1", Model: "gpt-4o", TokensIn: 1000, TokensOut: 1024, Cost: 0.5, KeySpend: KeySpendByUnit}
	prov := appendRecordLine(nil, &rec, lineProvisional)
	rec.prov = provStrings{requestID: rec.RequestID, teamID: rec.TeamID, tokenID: rec.TokenID, service: rec.Service, keyID: rec.KeyID, model: rec.Model}
	rec.Model, rec.TokenID = "gpt-4o\tmini\n", ""
	rec.Status, rec.TokensIn, rec.TokensOut, rec.Cost, rec.LatencyMS, rec.KeySpend = 200, 12, 34, 0.001, 900, 3
	delta := appendRecordLine(nil, &rec, lineDelta)
	whole := appendRecordLine(nil, &rec, lineFinal)
	for _, c := range []struct{ got, want string }{
		{string(prov), "f14c9ec3 2P\t1764583200123456789\t0123456789abcdef-1\treq\\\\1\tteam_a\ttok_a\tsvc\t\tkey_1\tgpt-4o\t0\t1000\t1024\t0\t0.5\t0\t-1\n"},
		{string(delta), "3aeea559 2D\t1764583200123456789\t0123456789abcdef-1\t68\t\tgpt-4o\\tmini\\n\t200\t12\t34\t0\t0.001\t900\t3\n"},
		{string(whole), "e814dd75 2F\t1764583200123456789\t0123456789abcdef-1\treq\\\\1\tteam_a\t\tsvc\t\tkey_1\tgpt-4o\\tmini\\n\t200\t12\t34\t0\t0.001\t900\t3\n"},
	} {
		if c.got != c.want {
			t.Errorf("line\n got %q\nwant %q", c.got, c.want)
		}
	}
	got, provisional, ok := decodeRecord(whole)
	want := rec
	want.prov = provStrings{}
	if !ok || provisional || !got.Time.Equal(want.Time) {
		t.Fatalf("whole line decodes to %+v (provisional %v, ok %v)", got, provisional, ok)
	}
	got.Time, want.Time = time.Time{}, time.Time{}
	if got != want {
		t.Errorf("whole line decodes to\n %+v\nwant %+v", got, want)
	}
}

// TestJournalDeltaLine: a final record whose provisional line is in the
// journal is written as a delta naming only what changed, and replay
// rebuilds the whole record from the two lines: string fields that
// changed (the model the upstream answered with, a key cleared) and
// every number.
func TestJournalDeltaLine(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, 0)
	rec := UsageRecord{Time: time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC), ID: "r1", RequestID: "req1", TeamID: "team_a",
		TokenID: "tok_a", Service: "svc", Router: "rtr", KeyID: "key_1", Model: "gpt-4o", TokensIn: 1000, TokensOut: 1024, Cost: 0.5, KeySpend: KeySpendByUnit}
	if err := j.AppendProvisional(&rec); err != nil {
		t.Fatal(err)
	}
	rec.Time = rec.Time.Add(time.Second)
	rec.Model, rec.TokenID = "gpt-4o-2024-08-06", ""
	rec.Status, rec.TokensIn, rec.TokensOut, rec.CachedTokens, rec.Cost, rec.LatencyMS, rec.KeySpend = 200, 12, 34, 0, 0, 900, 0
	delta := appendRecordLine(nil, &rec, lineDelta)
	for _, unchanged := range []string{"req1", "team_a", "key_1", "svc", "rtr"} {
		if strings.Contains(string(delta), unchanged) {
			t.Errorf("delta repeats %s: %s", unchanged, delta)
		}
	}
	if err := j.Append(&rec); err != nil {
		t.Fatal(err)
	}
	j.crash()
	live := openTestJournal(t, dir, 0)
	defer live.Close()
	st := newIDStore()
	if stats, err := live.ReplayOrphans(context.Background(), st); err != nil || stats.Records != 1 || stats.Torn != 0 {
		t.Fatalf("replay: %+v, %v", stats, err)
	}
	got, want := st.byID["r1"], rec
	if !got.Time.Equal(want.Time) {
		t.Errorf("time %v, want %v", got.Time, want.Time)
	}
	got.Time, want.Time = time.Time{}, time.Time{}
	want.seg, want.pseg, want.prov = 0, 0, provStrings{}
	if got != want {
		t.Errorf("replayed:\n got %+v\nwant %+v", got, want)
	}
}
