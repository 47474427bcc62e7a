package server

import (
	"bufio"
	"context"
	"io"
	"sync"
	"time"
)

// logFlushInterval bounds how long a log line may wait in the buffer.
const logFlushInterval = 100 * time.Millisecond

// logBuffer batches log writes: one write system call per flush instead of
// one per line, which matters at thousands of access lines a second. It
// flushes every logFlushInterval, when 64 KiB are pending, and on Close.
// It is safe for concurrent use.
type logBuffer struct {
	mu sync.Mutex // protects w and dirty
	w  *bufio.Writer
	// dirty reports whether w holds unflushed data.
	dirty bool
}

func newLogBuffer(w io.Writer) *logBuffer {
	return &logBuffer{w: bufio.NewWriterSize(w, 64<<10)}
}

// Write buffers p (one log record).
func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.dirty = true
	return b.w.Write(p)
}

// Flush writes what is buffered.
func (b *logBuffer) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.dirty {
		return nil
	}
	b.dirty = false
	return b.w.Flush()
}

// run flushes periodically until ctx ends, then once more.
func (b *logBuffer) run(ctx context.Context) {
	t := time.NewTicker(logFlushInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			_ = b.Flush()
			return
		case <-t.C:
			_ = b.Flush()
		}
	}
}
