//go:build unix

package store

import (
	"errors"
	"io"
	"os"
	"syscall"
)

// lockFile opens (creating) path and takes an exclusive advisory lock on
// it without waiting. ok is false when another process holds it, or when
// path was replaced or removed meanwhile (a replayer deleting it).
func lockFile(path string) (f *os.File, ok bool, err error) {
	f, err = os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, false, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, false, nil
		}
		return nil, false, err
	}
	held, err1 := f.Stat()
	now, err2 := os.Stat(path)
	if err1 != nil || err2 != nil || !os.SameFile(held, now) {
		_ = f.Close()
		return nil, false, nil
	}
	return f, true, nil
}

// datasync flushes f's data to stable storage (fdatasync where the
// platform has it).
func datasync(f *os.File) error { return fdatasync(f) }

// syncDir makes a new file's directory entry durable.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// Write appends b with write(2) on the descriptor directly: only a
// group's leader writes, so os.File's locking and poller bookkeeping
// would be spent for nothing on a call made for every group.
func (p plainFile) Write(b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := syscall.Write(p.fd, b[n:])
		if err == syscall.EINTR {
			continue
		}
		if m > 0 {
			n += m
		}
		if err != nil {
			return n, err
		}
		if m == 0 {
			return n, io.ErrShortWrite
		}
	}
	return n, nil
}
