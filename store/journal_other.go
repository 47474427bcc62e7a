//go:build !unix

package store

import "os"

// lockFile creates path exclusively: without flock, a lock file that
// exists is taken as held, so journals of processes that died are
// replayed only after their lock file is removed by hand.
func lockFile(path string) (*os.File, bool, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if os.IsExist(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	return f, true, nil
}

func datasync(f *os.File) error { return f.Sync() }

func syncDir(string) {}

// Write appends b.
func (p plainFile) Write(b []byte) (int, error) { return p.f.Write(b) }
