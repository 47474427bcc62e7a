package server

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/keypool/keypool/store"
)

// journalRescan is how often a running keypoold looks for the journals of
// other processes that died (replicas sharing its data directory).
const journalRescan = 30 * time.Second

// openJournal opens this process's usage journal and replays into the
// store the journals of processes that died before their records reached
// it, before the pool loads keys (so balances include their spend) and
// before the local budget counters are seeded from stored usage. A replay
// that fails is logged and retried in the background: the files stay.
func (s *Server) openJournal(ctx context.Context) error {
	jc := s.cfg.UsageJournal
	dir := jc.Dir
	if dir == "" {
		dir = filepath.Join(s.cfg.DataDir, "journal")
	}
	j, err := store.OpenJournal(store.JournalOptions{Dir: dir, SyncInterval: time.Duration(jc.SyncInterval),
		SegmentBytes: jc.SegmentBytes, Logger: s.log})
	if err != nil {
		return fmt.Errorf("server: usage journal: %w", err)
	}
	s.journal = j
	st, err := j.ReplayOrphans(ctx, s.st)
	if err != nil {
		s.log.Error("replaying usage journals failed; retrying in the background", "err", err)
	}
	if st.Journals > 0 {
		s.log.Info("usage journals replayed", "journals", st.Journals, "records", st.Records, "torn_lines", st.Torn)
	}
	return nil
}

// replayJournals replays, every journalRescan until ctx is done, the
// journals of processes sharing the journal directory that died.
func (s *Server) replayJournals(ctx context.Context) {
	t := time.NewTicker(journalRescan)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := s.journal.ReplayOrphans(ctx, s.st); err != nil && ctx.Err() == nil {
			s.log.Warn("replaying usage journals failed; will retry", "err", err)
		}
	}
}
