package store

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
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
// Appends commit in groups: the records of concurrent callers are
// written together with one write(2) by the first of them (the group's
// leader) while the others wait for it, and each caller returns once its
// own record is written. A group forms while the previous one is being
// written, so a lone caller writes at once and a busy journal makes one
// system call for many records.
//
// Each process writes its own files, named after a random instance id
// ("usage-<instance>-<n>.log"), and holds an advisory lock (flock) on
// "usage-<instance>.lock" while it lives, so processes can share a
// directory. [Journal.ReplayOrphans] appends to a store the records of
// every journal in the directory whose process is gone, then deletes
// them; replay is idempotent because records carry unique ids (see
// [UsageRecord]). The directory must be on a local file system (flock).
//
// A record is one line: the CRC-32C of the rest of the line in 8 hex
// digits, a space, the format and kind, the fields separated by tabs, a
// newline (format 2, described in journal_encode.go; lines of format 1,
// JSON, are replayed too). A request's final record follows its
// provisional line ([Journal.AppendProvisional]) as a delta that names
// only what changed; the provisional line stays in its file until the
// store has the final record, so replay always rebuilds it. A torn last
// line (the process died in the middle of a write) or a line whose
// checksum does not match is skipped on replay and counted.
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
	cur     *segment   // written to outside mu by the group leader; rotated only while no group is written
	segs    map[uint64]*segment
	next    uint64
	dirty   bool
	dirNew  bool      // a file was created since the directory was synced
	retired []segFile // rotated-out files with records not yet stored: synced and closed off the lock
	closed  bool
	failed  bool          // a write failed; logged once until one succeeds
	fill    *jgroup       // the group that new records join, whose leader waits for its turn; nil when none
	writing bool          // a group is being written (by its leader, outside mu) or handed over to the next
	turn    chan struct{} // the leader of a group done writing hands over to j.fill's leader
	idle    chan struct{} // closed when writing ends, once Close waits for it
	spare   *jgroup       // a lone line's group, for reuse
	free    [][]byte      // written groups' buffers, for reuse
	groups  int64         // groups written
	lines   int64         // lines in them
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
		stop: make(chan struct{}), done: make(chan struct{}), turn: make(chan struct{}, 1)}
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

// rotate starts a new segment; the caller holds j.mu and no group is
// being written (or it is the group's leader, before or after its
// write). The old segment is deleted when all its records are done;
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

// segFile is an open journal segment. A group of records is written with
// one write(2): in the kernel's page cache when Append returns, which a
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
type plainFile struct {
	f  *os.File
	fd int
}

func openPlainFile(path string) (segFile, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	return plainFile{f: f, fd: int(f.Fd())}, nil
}

func (p plainFile) Sync() error  { return datasync(p.f) }
func (p plainFile) Close() error { return p.f.Close() }

// remove deletes a closed segment whose records are all done; the caller
// holds j.mu.
func (j *Journal) remove(s *segment) {
	delete(j.segs, s.seq)
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		j.log.Warn("store: journal: removing a replayed segment failed", "file", filepath.Base(s.path), "err", err)
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
	wait := j.awaitGroupsLocked()
	j.mu.Unlock()
	if wait != nil {
		<-wait // records accepted before Close are written
	}
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
