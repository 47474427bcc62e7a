package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// UsageAppender is what a [UsageWriter] writes to; every [Store] is one.
type UsageAppender interface {
	AppendUsage(ctx context.Context, recs []UsageRecord) error
}

// UsagePruner deletes old usage records; a [UsageWriter] prunes through it
// when its appender implements it.
type UsagePruner interface {
	PruneUsage(ctx context.Context, before time.Time) (int64, error)
}

// UsageWriterOptions configures a [UsageWriter]. Zero values pick the
// documented defaults.
type UsageWriterOptions struct {
	// BatchSize is the most records one AppendUsage call writes; a full
	// batch is flushed at once. If zero, 1000.
	BatchSize int `json:"batch_size,omitempty"`
	// Interval is how often buffered records are flushed. If zero, 1s.
	Interval time.Duration `json:"interval,omitempty"`
	// MaxBuffered bounds the records held in memory. When the buffer is
	// full, Add writes the buffer itself, synchronously: a slow store slows
	// callers down rather than losing records. Only when that write fails
	// too are the records dropped (and counted by [UsageWriter.Dropped]);
	// with a Journal they stay in it and are replayed on the next start.
	// If zero, 100 * BatchSize.
	MaxBuffered int `json:"max_buffered,omitempty"`
	// FlushTimeout bounds one AppendUsage call. If zero, 30s.
	FlushTimeout time.Duration `json:"flush_timeout,omitempty"`
	// Retention is how long usage records are kept when the appender is
	// also a [UsagePruner]. If zero, 30 days; negative disables pruning.
	Retention time.Duration `json:"retention,omitempty"`
	// PruneInterval is how often old records are pruned; the first prune
	// runs at start. If zero, 1h.
	PruneInterval time.Duration `json:"prune_interval,omitempty"`
	// Logger receives flush and prune failures (counts only, never record
	// contents). If nil, slog.Default().
	Logger *slog.Logger `json:"-"`
	// Journal, if set, makes records crash-safe: Add appends each record
	// to it before buffering it, and records are marked done in it once
	// the store has them. The writer does not close it.
	Journal *Journal `json:"-" yaml:"-"`
}

// UsageWriter buffers usage records and appends them in batches off the
// request path: every Interval, whenever a batch fills, and on Close. A
// failed background flush keeps its records for the next attempt. Each
// record gets a unique ID when it has none. With a [Journal]
// ([UsageWriterOptions.Journal]) every record is in the journal before Add
// returns, so a crash of the process loses none. It starts a goroutine,
// stopped by [UsageWriter.Close]; it is safe for concurrent use and must
// not be copied.
type UsageWriter struct {
	idPrefix string
	idSeq    atomic.Uint64
	dst      UsageAppender
	opts     UsageWriterOptions
	log      *slog.Logger
	kick     chan struct{} // a batch is full
	stop     chan struct{} // closed by Close
	done     chan struct{} // closed when the goroutine exits
	ticks    <-chan time.Time
	now      func() time.Time

	dropped atomic.Int64
	written atomic.Int64

	mu     sync.Mutex // protects buf and closed
	buf    []UsageRecord
	closed bool
}

// ErrUsageWriterClosed is returned by [UsageWriter.Close] when called twice.
var ErrUsageWriterClosed = errors.New("store: usage writer closed")

// NewUsageWriter starts a writer that appends to dst.
func NewUsageWriter(dst UsageAppender, opts UsageWriterOptions) *UsageWriter {
	return newUsageWriter(dst, opts, nil, time.Now)
}

// newUsageWriter lets tests drive the flush ticker and the clock.
func newUsageWriter(dst UsageAppender, opts UsageWriterOptions, ticks <-chan time.Time, now func() time.Time) *UsageWriter {
	if opts.BatchSize <= 0 {
		opts.BatchSize = 1000
	}
	if opts.Interval <= 0 {
		opts.Interval = time.Second
	}
	if opts.MaxBuffered <= 0 {
		opts.MaxBuffered = 100 * opts.BatchSize
	}
	if opts.MaxBuffered < opts.BatchSize {
		opts.MaxBuffered = opts.BatchSize
	}
	if opts.FlushTimeout <= 0 {
		opts.FlushTimeout = 30 * time.Second
	}
	if opts.Retention == 0 {
		opts.Retention = 30 * 24 * time.Hour
	}
	if opts.PruneInterval <= 0 {
		opts.PruneInterval = time.Hour
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	w := &UsageWriter{
		idPrefix: hex.EncodeToString(b[:]) + "-",
		dst:      dst,
		opts:     opts,
		log:      opts.Logger,
		kick:     make(chan struct{}, 1),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
		now:      now,
	}
	if w.log == nil {
		w.log = slog.Default()
	}
	var ticker *time.Ticker
	if ticks == nil {
		ticker = time.NewTicker(opts.Interval)
		ticks = ticker.C
	}
	w.ticks = ticks
	go w.run(ticker)
	return w
}

// Add buffers one record. It does not block on the store unless the
// buffer is full (see [UsageWriterOptions.MaxBuffered]). Records added
// after Close are dropped and counted.
func (w *UsageWriter) Add(rec UsageRecord) {
	if rec.Time.IsZero() {
		rec.Time = w.now()
	}
	if rec.ID == "" {
		rec.ID = w.idPrefix + strconv.FormatUint(w.idSeq.Add(1), 36)
	}
	if j := w.opts.Journal; j != nil {
		// Failures are logged by the journal; the record is still
		// buffered for the store. Its provisional line, if any, is
		// done once the store has it (journalDone).
		_ = j.Append(&rec)
	}
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		w.dropped.Add(1)
		return
	}
	w.buf = append(w.buf, rec)
	n := len(w.buf)
	var full []UsageRecord
	if n >= w.opts.MaxBuffered {
		full, w.buf = w.buf, nil
	}
	w.mu.Unlock()

	if full != nil {
		// Back-pressure: write in the caller rather than lose records.
		if n, err := w.write(context.Background(), full); err != nil {
			lost := len(full) - n
			w.dropped.Add(int64(lost))
			w.log.Error("store: usage buffer full and flush failed; records dropped", "dropped", lost, "err", err)
		}
		return
	}
	if n >= w.opts.BatchSize {
		select {
		case w.kick <- struct{}{}:
		default:
		}
	}
}

// Provisional stamps rec with an ID (and a time) when it has none and,
// with a journal, writes a provisional line for it: what is known of a
// request when the upstream's answer arrives, so that a crash before the
// request finishes still leaves a record of it (replayed if no final
// record follows). The caller then fills in rec's final fields and passes
// it to Add, which supersedes the provisional line; calling Provisional
// again on rec (a retry on another key) supersedes the earlier line.
// Without a journal only the stamping happens.
func (w *UsageWriter) Provisional(rec *UsageRecord) {
	if rec.Time.IsZero() {
		rec.Time = w.now()
	}
	if rec.ID == "" {
		rec.ID = w.idPrefix + strconv.FormatUint(w.idSeq.Add(1), 36)
	}
	if j := w.opts.Journal; j != nil {
		_ = j.AppendProvisional(rec) // a retry's provisional line supersedes the earlier one
	}
}

// Dropped returns how many records were lost: added after Close, or
// dropped when a full buffer could not be written.
func (w *UsageWriter) Dropped() int64 { return w.dropped.Load() }

// Written returns how many records were appended.
func (w *UsageWriter) Written() int64 { return w.written.Load() }

// Buffered returns how many records wait to be written.
func (w *UsageWriter) Buffered() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.buf)
}

// Flush writes every buffered record now, in batches.
func (w *UsageWriter) Flush(ctx context.Context) error {
	for {
		w.mu.Lock()
		recs := w.buf
		w.buf = nil
		w.mu.Unlock()
		if len(recs) == 0 {
			return nil
		}
		if n, err := w.write(ctx, recs); err != nil {
			w.requeue(recs[n:])
			return err
		}
	}
}

// write appends recs in batches of BatchSize and returns how many it
// wrote.
func (w *UsageWriter) write(ctx context.Context, recs []UsageRecord) (int, error) {
	done := 0
	for done < len(recs) {
		n := min(len(recs)-done, w.opts.BatchSize)
		cctx, cancel := context.WithTimeout(ctx, w.opts.FlushTimeout)
		err := w.dst.AppendUsage(cctx, recs[done:done+n])
		cancel()
		if err != nil {
			return done, fmt.Errorf("store: append usage: %w", err)
		}
		w.written.Add(int64(n))
		w.journalDone(recs[done : done+n])
		done += n
	}
	return done, nil
}

// journalDone marks stored records done in the journal, and the
// provisional lines their final lines change: one call per run of
// records from the same segment.
func (w *UsageWriter) journalDone(recs []UsageRecord) {
	j := w.opts.Journal
	if j == nil {
		return
	}
	doneRuns(j, recs, func(r *UsageRecord) uint64 { return r.seg })
	doneRuns(j, recs, func(r *UsageRecord) uint64 { return r.pseg })
}

// doneRuns calls j.Done once per run of recs whose segment (seg of the
// record) is the same.
func doneRuns(j *Journal, recs []UsageRecord, seg func(*UsageRecord) uint64) {
	for i := 0; i < len(recs); {
		s, k := seg(&recs[i]), i+1
		for k < len(recs) && seg(&recs[k]) == s {
			k++
		}
		j.Done(s, k-i)
		i = k
	}
}

// requeue puts records that failed to write back at the front of the
// buffer, keeping at most MaxBuffered (the newest are dropped first, so
// the order of what is kept is preserved).
func (w *UsageWriter) requeue(recs []UsageRecord) {
	if len(recs) == 0 {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	merged := append(recs[:len(recs):len(recs)], w.buf...)
	if over := len(merged) - w.opts.MaxBuffered; over > 0 {
		w.dropped.Add(int64(over))
		merged = merged[:w.opts.MaxBuffered]
	}
	w.buf = merged
}

func (w *UsageWriter) run(ticker *time.Ticker) {
	defer close(w.done)
	if ticker != nil {
		defer ticker.Stop()
	}
	pruner, prune := w.dst.(UsagePruner)
	prune = prune && w.opts.Retention > 0
	var pruneC <-chan time.Time
	if prune {
		pt := time.NewTicker(w.opts.PruneInterval)
		defer pt.Stop()
		pruneC = pt.C
		w.prune(pruner)
	}
	for {
		select {
		case <-w.stop:
			return
		case <-w.ticks:
		case <-w.kick:
		case <-pruneC:
			w.prune(pruner)
			continue
		}
		w.flushBackground()
	}
}

func (w *UsageWriter) flushBackground() {
	ctx := context.Background()
	for {
		w.mu.Lock()
		n := min(len(w.buf), w.opts.BatchSize)
		batch := make([]UsageRecord, n)
		copy(batch, w.buf[:n])
		w.buf = w.buf[n:]
		more := len(w.buf) >= w.opts.BatchSize
		w.mu.Unlock()
		if n == 0 {
			return
		}
		if _, err := w.write(ctx, batch); err != nil {
			w.requeue(batch)
			w.log.Warn("store: usage flush failed; will retry", "records", n, "err", err)
			return
		}
		if !more {
			return
		}
	}
}

func (w *UsageWriter) prune(p UsagePruner) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	n, err := p.PruneUsage(ctx, w.now().Add(-w.opts.Retention))
	if err != nil {
		w.log.Warn("store: usage prune failed", "err", err)
		return
	}
	if n > 0 {
		w.log.Info("store: pruned old usage records", "deleted", n, "retention", w.opts.Retention.String())
	}
}

// Close stops the background goroutine and writes every buffered record,
// so a clean shutdown loses nothing. It returns an error if ctx ends or the
// store fails before everything is written; the records not written are
// then counted as dropped.
func (w *UsageWriter) Close(ctx context.Context) error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return ErrUsageWriterClosed
	}
	w.closed = true
	w.mu.Unlock()
	close(w.stop)
	select {
	case <-w.done:
	case <-ctx.Done():
		return fmt.Errorf("store: close usage writer: %w", ctx.Err())
	}
	if err := w.Flush(ctx); err != nil {
		w.mu.Lock()
		n := len(w.buf)
		w.buf = nil
		w.mu.Unlock()
		w.dropped.Add(int64(n))
		return fmt.Errorf("store: close usage writer: %d records not written: %w", n, err)
	}
	return nil
}
