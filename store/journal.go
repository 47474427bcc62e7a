package store

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// JournalOptions configures a [Journal]. Zero values pick the documented
// defaults.
type JournalOptions struct {
	// Dir is the directory of the journal files. Required. Several
	// processes may share it: each writes its own files.
	Dir string `json:"dir,omitempty" yaml:"dir,omitempty"`
	// SyncInterval is how often the journal is flushed to stable storage
	// (fdatasync, one call for every record written since: group commit).
	// Every record is written to the operating system before Append
	// returns, so a process crash (kill -9, OOM, panic) loses nothing;
	// SyncInterval bounds what an operating-system crash or power loss can
	// lose. If zero, 1s; negative leaves flushing to the operating system.
	SyncInterval time.Duration `json:"sync_interval,omitempty" yaml:"sync_interval,omitempty"`
	// SegmentBytes is the size after which the journal starts a new file;
	// a file is deleted once every record in it is in the store. If zero,
	// 8 MiB.
	SegmentBytes int64 `json:"segment_bytes,omitempty" yaml:"segment_bytes,omitempty"`
	// Logger receives replay and write failures (counts and file names,
	// never record contents). If nil, slog.Default().
	Logger *slog.Logger `json:"-" yaml:"-"`
}

// Journal is a local append-only log of usage records that makes them
// survive a crash of the process before they reach the store. A
// [UsageWriter] with a Journal appends each record to it (written to the
// operating system before [UsageWriter.Add] returns) and marks it done
// once the store has it; files whose records are all done are deleted.
//
// Each process writes its own files, named after a random instance id
// ("usage-<instance>-<n>.log"), and holds an advisory lock (flock) on
// "usage-<instance>.lock" while it lives, so processes can share a
// directory. [Journal.ReplayOrphans] appends to a store the records of
// every journal in the directory whose process is gone, then deletes
// them; replay is idempotent because records carry unique ids (see
// [UsageRecord]). The directory must be on a local file system (flock).
//
// A record is one line: the CRC-32C of its JSON in 8 hex digits, a
// space, the JSON, a newline. A torn last line (the process died in the
// middle of a write) or a line whose checksum does not match is skipped
// on replay and counted.
//
// A Journal is safe for concurrent use; it starts a goroutine (the
// periodic sync), stopped by [Journal.Close].
type Journal struct {
	dir      string
	inst     string
	segBytes int64
	log      *slog.Logger
	lock     *os.File
	stop     chan struct{}
	done     chan struct{}

	syncs bool // a sync goroutine runs (SyncInterval > 0)

	mu      sync.Mutex // protects everything below
	cur     *segment
	segs    map[uint64]*segment
	next    uint64
	dirty   bool
	dirNew  bool      // a file was created since the directory was synced
	retired []segFile // rotated-out files with records not yet stored: synced and closed off the lock
	closed  bool
	failed  bool // a write failed; logged once until one succeeds
}

type segment struct {
	seq      uint64
	path     string
	f        segFile // nil once closed
	bytes    int64
	appended int64
	done     int64
}

// Errors of a [Journal].
var (
	// ErrJournalClosed is returned by Append after Close.
	ErrJournalClosed = errors.New("store: journal closed")
)

const (
	journalPrefix = "usage-"
	journalExt    = ".log"
	journalLock   = ".lock"
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// OpenJournal creates opts.Dir if needed and starts a journal for this
// process under a new instance id.
func OpenJournal(opts JournalOptions) (*Journal, error) {
	if opts.Dir == "" {
		return nil, errors.New("store: journal needs a directory")
	}
	if opts.SyncInterval == 0 {
		opts.SyncInterval = time.Second
	}
	if opts.SegmentBytes <= 0 {
		opts.SegmentBytes = 8 << 20
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: journal directory: %w", err)
	}
	j := &Journal{dir: opts.Dir, segBytes: opts.SegmentBytes, log: opts.Logger, segs: map[uint64]*segment{},
		stop: make(chan struct{}), done: make(chan struct{})}
	if j.log == nil {
		j.log = slog.Default()
	}
	// A fresh random id; retry on the (unlikely) clash with a file a
	// replayer holds.
	for range 5 {
		var b [8]byte
		_, _ = rand.Read(b[:])
		inst := hex.EncodeToString(b[:])
		f, ok, err := lockFile(filepath.Join(opts.Dir, journalPrefix+inst+journalLock))
		if err != nil {
			return nil, fmt.Errorf("store: journal lock: %w", err)
		}
		if ok {
			j.inst, j.lock = inst, f
			break
		}
	}
	if j.lock == nil {
		return nil, errors.New("store: journal: could not lock an instance file")
	}
	j.mu.Lock()
	err := j.rotate()
	j.mu.Unlock()
	if err != nil {
		j.unlock()
		return nil, err
	}
	syncDir(j.dir)
	if opts.SyncInterval > 0 {
		j.syncs = true
		go j.syncLoop(opts.SyncInterval)
	} else {
		close(j.done)
	}
	return j, nil
}

// Instance returns the journal's instance id (in its file names).
func (j *Journal) Instance() string { return j.inst }

// rotate starts a new segment; the caller holds j.mu. The old segment is deleted when all its records are done;
// otherwise the sync goroutine syncs and closes it (no disk flush under
// the lock).
func (j *Journal) rotate() error {
	j.next++
	seq := j.next
	path := filepath.Join(j.dir, fmt.Sprintf("%s%s-%08d%s", journalPrefix, j.inst, seq, journalExt))
	f, err := openPlainFile(path)
	if err != nil {
		return fmt.Errorf("store: journal segment: %w", err)
	}
	if old := j.cur; old != nil {
		if old.done >= old.appended || !j.syncs {
			_ = old.f.Close()
		} else {
			j.retired = append(j.retired, old.f)
		}
		old.f = nil
		if old.done >= old.appended {
			j.remove(old)
		}
	}
	j.cur = &segment{seq: seq, path: path, f: f}
	j.segs[seq] = j.cur
	j.dirNew, j.dirty = true, true
	return nil
}

// segFile is an open journal segment. Records are written with one
// write(2) each: in the kernel's page cache when Append returns, which a
// process crash does not lose. (A preallocated file mapped into memory
// avoids the system call but was slower on ext4: each first write to a
// page faults into the file system.)
type segFile interface {
	// Write appends p.
	Write(p []byte) (int, error)
	// Sync flushes what was written to stable storage.
	Sync() error
	// Close releases the file; what was written stays.
	Close() error
}

// plainFile is a segFile on write(2).
type plainFile struct{ f *os.File }

func openPlainFile(path string) (segFile, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	return plainFile{f}, nil
}

func (p plainFile) Write(b []byte) (int, error) { return p.f.Write(b) }
func (p plainFile) Sync() error                 { return datasync(p.f) }
func (p plainFile) Close() error                { return p.f.Close() }

// remove deletes a closed segment whose records are all done; the caller
// holds j.mu.
func (j *Journal) remove(s *segment) {
	delete(j.segs, s.seq)
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		j.log.Warn("store: journal: removing a replayed segment failed", "file", filepath.Base(s.path), "err", err)
	}
}

// encodeRecord returns the journal line of rec.
func encodeRecord(rec *UsageRecord) ([]byte, error) {
	return appendRecordLine(nil, rec, false), nil
}

// lineBufs recycles encoding buffers: Append runs once per request.
var lineBufs = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// Append writes rec to the journal (to the operating system, before it
// returns) and notes on rec which segment holds it, for [Journal.Done].
func (j *Journal) Append(rec *UsageRecord) error { return j.append(rec, false) }

// AppendProvisional writes a provisional line for rec: what is known of a
// request when the upstream's answer arrives (its key, status and the
// admission estimate), replayed only if the process dies before the final
// record with the same ID is appended. The line counts as a record of its
// segment until [UsageWriter.Add] appends the final one and marks it done.
func (j *Journal) AppendProvisional(rec *UsageRecord) error { return j.append(rec, true) }

func (j *Journal) append(rec *UsageRecord, provisional bool) error {
	bp := lineBufs.Get().(*[]byte)
	line := appendRecordLine((*bp)[:0], rec, provisional)
	defer func() {
		if cap(line) <= 64<<10 {
			*bp = line
			lineBufs.Put(bp)
		}
	}()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return ErrJournalClosed
	}
	if j.cur.bytes >= j.segBytes {
		if err := j.rotate(); err != nil {
			return err
		}
	}
	n, err := j.cur.f.Write(line)
	j.cur.bytes += int64(n)
	if err != nil {
		if !j.failed {
			j.failed = true
			j.log.Error("store: journal write failed; usage records are not crash-safe until it works again", "err", err)
		}
		if n > 0 {
			// A partial line: start a new file so the next record does
			// not follow garbage (replay skips the torn line).
			_ = j.rotate()
		}
		return fmt.Errorf("store: journal: %w", err)
	}
	j.failed = false
	j.cur.appended++
	j.dirty = true
	if provisional {
		rec.pseg = j.cur.seq
	} else {
		rec.seg = j.cur.seq
	}
	return nil
}

// Done marks n records of segment seg as stored. A segment other than
// the current one is deleted once all its records are done; the current
// one is rotated out and deleted when it is all done and at least a
// sixteenth of SegmentBytes, so a quiet journal stays small.
func (j *Journal) Done(seg uint64, n int) {
	if seg == 0 || n <= 0 {
		return
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	s := j.segs[seg]
	if s == nil {
		return
	}
	s.done += int64(n)
	if s.done < s.appended {
		return
	}
	if s != j.cur {
		j.remove(s)
	} else if !j.closed && s.bytes >= j.segBytes/16 {
		_ = j.rotate()
	}
}

func (j *Journal) syncLoop(every time.Duration) {
	defer close(j.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-j.stop:
			return
		case <-t.C:
		}
		j.syncOnce()
	}
}

// syncOnce flushes the current file, rotated-out files (then closed) and
// the directory, if anything changed since the last call.
func (j *Journal) syncOnce() {
	j.mu.Lock()
	var f segFile
	if j.dirty && j.cur != nil {
		f, j.dirty = j.cur.f, false
	}
	retired, dirNew := j.retired, j.dirNew
	j.retired, j.dirNew = nil, false
	j.mu.Unlock()
	for _, r := range retired {
		_ = r.Sync()
		_ = r.Close()
	}
	if f != nil {
		// A rotation may retire f meanwhile; it is synced again then.
		_ = f.Sync()
	}
	if dirNew {
		syncDir(j.dir)
	}
}

// Close syncs and closes the journal. Segments whose records are all
// done are deleted, and with them the instance's lock file; segments
// with records the store does not have yet are kept for a replay.
func (j *Journal) Close() error {
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return ErrJournalClosed
	}
	j.closed = true
	j.mu.Unlock()
	close(j.stop)
	<-j.done
	j.syncOnce()
	j.mu.Lock()
	defer j.mu.Unlock()
	var err error
	if c := j.cur; c != nil && c.f != nil {
		err = errors.Join(c.f.Sync(), c.f.Close())
		c.f = nil
	}
	kept := 0
	for _, s := range j.segs {
		if s.done >= s.appended {
			j.remove(s)
		} else {
			kept++
		}
	}
	if kept > 0 {
		j.log.Warn("store: journal keeps records the store does not have; they are replayed on the next start", "files", kept)
	} else {
		_ = os.Remove(j.lock.Name())
	}
	j.unlock()
	if err != nil {
		return fmt.Errorf("store: journal close: %w", err)
	}
	return nil
}

func (j *Journal) unlock() {
	if j.lock != nil {
		_ = j.lock.Close() // releases the flock
	}
}

// ReplayStats counts what a replay did.
type ReplayStats struct {
	// Journals is how many dead processes' journals were replayed.
	Journals int
	// Records is how many records were read and appended (a record the
	// store already had is skipped by the store).
	Records int
	// Torn is how many lines were skipped: torn by a crash mid-write or
	// failing their checksum.
	Torn int
}

// replayBatch is how many records one replay AppendUsage carries.
const replayBatch = 1000

// ReplayOrphans appends to dst the records of every journal in the
// directory whose process is gone (its instance lock is free), this
// journal's own excepted, and deletes those journals once dst has them.
// Several processes may call it at once: each orphan is replayed by one.
// A journal that fails to replay is left in place for the next call.
func (j *Journal) ReplayOrphans(ctx context.Context, dst UsageAppender) (ReplayStats, error) {
	return replayDir(ctx, j.dir, j.inst, dst, j.log)
}

func replayDir(ctx context.Context, dir, self string, dst UsageAppender, log *slog.Logger) (ReplayStats, error) {
	var st ReplayStats
	ents, err := os.ReadDir(dir)
	if err != nil {
		return st, fmt.Errorf("store: journal replay: %w", err)
	}
	segs := map[string][]string{} // instance → segment files
	var locks []string            // instances with a lock file
	for _, e := range ents {
		name := e.Name()
		if inst, ok := strings.CutSuffix(strings.TrimPrefix(name, journalPrefix), journalLock); ok && inst != self &&
			strings.HasPrefix(name, journalPrefix) {
			locks = append(locks, inst)
			continue
		}
		if !strings.HasPrefix(name, journalPrefix) || !strings.HasSuffix(name, journalExt) {
			continue
		}
		inst, _, ok := strings.Cut(strings.TrimSuffix(strings.TrimPrefix(name, journalPrefix), journalExt), "-")
		if !ok || inst == self {
			continue
		}
		segs[inst] = append(segs[inst], filepath.Join(dir, name))
	}
	// A lock file whose process died after all its records were stored
	// has no segments left: remove it once it can be locked.
	for _, inst := range locks {
		if _, ok := segs[inst]; ok {
			continue
		}
		path := filepath.Join(dir, journalPrefix+inst+journalLock)
		if lf, ok, err := lockFile(path); err == nil && ok {
			_ = os.Remove(path)
			_ = lf.Close()
		}
	}
	var errs []error
	for inst, files := range segs {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		lockPath := filepath.Join(dir, journalPrefix+inst+journalLock)
		lf, ok, err := lockFile(lockPath)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !ok {
			continue // its process is alive
		}
		slices.Sort(files) // zero-padded sequence numbers: oldest first
		n, torn, err := replayFiles(ctx, files, dst)
		st.Records += n
		st.Torn += torn
		if err != nil {
			_ = lf.Close()
			errs = append(errs, fmt.Errorf("store: journal replay of %s: %w", inst, err))
			continue
		}
		for _, f := range files {
			_ = os.Remove(f)
		}
		_ = os.Remove(lockPath)
		_ = lf.Close()
		st.Journals++
		log.Info("store: replayed the usage journal of a stopped process", "instance", inst, "records", n, "torn_lines", torn)
	}
	return st, errors.Join(errs...)
}

// replayFiles appends the records of files to dst in batches: each
// final record, and the provisional record of a request whose final
// record was never written (the process died while relaying its answer).
func replayFiles(ctx context.Context, files []string, dst UsageAppender) (n, torn int, err error) {
	var recs []UsageRecord
	at := map[string]int{} // id → index in recs
	final := map[string]bool{}
	for _, path := range files {
		t, err := readSegment(path, func(rec UsageRecord, provisional bool) error {
			i, seen := at[rec.ID]
			switch {
			case rec.ID == "" || !seen:
				at[rec.ID] = len(recs)
				recs = append(recs, rec)
			case !final[rec.ID]:
				recs[i] = rec // a later line supersedes a provisional one
			default:
				return nil
			}
			if !provisional {
				final[rec.ID] = true
			}
			return nil
		})
		torn += t
		if err != nil {
			return n, torn, err
		}
	}
	for len(recs) > 0 {
		k := min(len(recs), replayBatch)
		if err := dst.AppendUsage(ctx, recs[:k]); err != nil {
			return n, torn, err
		}
		n += k
		recs = recs[k:]
	}
	return n, torn, nil
}

// readSegment calls fn for every intact record of a segment file (and
// whether it is provisional) and returns how many lines it skipped (torn
// or failing their checksum).
func readSegment(path string, fn func(rec UsageRecord, provisional bool) error) (torn int, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 64<<10)
	for {
		line, err := r.ReadBytes('\n')
		if len(line) > 0 && line[0] == 0 {
			return torn, nil // the unused, zeroed end of a preallocated file
		}
		if errors.Is(err, io.EOF) {
			if len(line) > 0 {
				torn++ // the last write was cut short
			}
			return torn, nil
		}
		if err != nil {
			return torn, err
		}
		rec, provisional, ok := decodeRecord(line)
		if !ok {
			torn++
			continue
		}
		if err := fn(rec, provisional); err != nil {
			return torn, err
		}
	}
}

// decodeRecord parses one journal line (with its newline) and reports
// whether it is a provisional record.
func decodeRecord(line []byte) (rec UsageRecord, provisional, ok bool) {
	if len(line) < 11 || line[8] != ' ' || line[len(line)-1] != '\n' {
		return rec, false, false
	}
	want, err := strconv.ParseUint(string(line[:8]), 16, 32)
	body := line[9 : len(line)-1]
	if err != nil || crc32.Checksum(body, crcTable) != uint32(want) {
		return rec, false, false
	}
	if len(body) > 0 && body[0] == 'P' {
		provisional, body = true, body[1:]
	}
	if json.Unmarshal(body, &rec) != nil {
		return rec, false, false
	}
	return rec, provisional, true
}
