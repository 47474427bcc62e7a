package server

import (
	"context"
	"fmt"
	"log/slog"
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
func (rs *records) openJournal(ctx context.Context, cfg Config, st store.UsageAppender, log *slog.Logger) error {
	rs.st, rs.log = st, log
	jc := cfg.UsageJournal
	dir := jc.Dir
	if dir == "" {
		dir = filepath.Join(cfg.DataDir, "journal")
	}
	j, err := store.OpenJournal(store.JournalOptions{Dir: dir, SyncInterval: time.Duration(jc.SyncInterval),
		SegmentBytes: jc.SegmentBytes, Logger: rs.log})
	if err != nil {
		return fmt.Errorf("server: usage journal: %w", err)
	}
	rs.journal = j
	rst, err := j.ReplayOrphans(ctx, rs.st)
	if err != nil {
		rs.log.Error("replaying usage journals failed; retrying in the background", "err", err)
	}
	if rst.Journals > 0 {
		rs.log.Info("usage journals replayed", "journals", rst.Journals, "records", rst.Records, "torn_lines", rst.Torn)
	}
	return nil
}

// replayJournals replays, every journalRescan until ctx is done, the
// journals of processes sharing the journal directory that died.
func (rs *records) replayJournals(ctx context.Context) {
	t := time.NewTicker(journalRescan)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := rs.journal.ReplayOrphans(ctx, rs.st); err != nil && ctx.Err() == nil {
			rs.log.Warn("replaying usage journals failed; will retry", "err", err)
		}
	}
}
