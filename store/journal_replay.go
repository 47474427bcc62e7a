package store

import (
	"bufio"
	"bytes"
	"context"
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
)

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
// A delta line applies to the provisional record of its ID, read before
// it; that line is kept until the store has the final record, so a delta
// without one is skipped (stored already).
func replayFiles(ctx context.Context, files []string, dst UsageAppender) (n, torn int, err error) {
	var recs []UsageRecord
	at := map[string]int{} // id → index in recs
	final := map[string]bool{}
	for _, path := range files {
		t, err := readSegment(path, func(body []byte, kind, format int) bool {
			var rec UsageRecord
			if kind == lineDelta {
				// A delta names its ID where a whole line does.
				id, ok := lineID(body, format)
				if !ok {
					return false
				}
				i, seen := at[id]
				if !seen || final[id] {
					// Its provisional line is deleted only once the
					// store has the record: nothing to replay.
					return true
				}
				rec = recs[i]
			}
			if !decodeLine(body, kind, format, &rec) {
				return false
			}
			i, seen := at[rec.ID]
			switch {
			case rec.ID == "" || !seen:
				at[rec.ID] = len(recs)
				recs = append(recs, rec)
			case !final[rec.ID]:
				recs[i] = rec // a later line supersedes a provisional one
			default:
				return true
			}
			if kind != lineProvisional {
				final[rec.ID] = true
			}
			return true
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

// readSegment calls fn with the body (after the kind), the kind and the
// format of every line of a segment file whose checksum holds; fn
// reports whether the line could be used. readSegment returns how many lines it skipped (torn, failing
// their checksum, or refused by fn).
func readSegment(path string, fn func(body []byte, kind, format int) bool) (torn int, err error) {
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
		body, kind, format, ok := checkLine(line)
		if !ok || !fn(body, kind, format) {
			torn++
		}
	}
}

// checkLine verifies one journal line (with its newline) and returns its
// body after the kind (format 1: the JSON; format 2: the fields, each
// after a tab), its kind and its format (1 or 2).
func checkLine(line []byte) (body []byte, kind, format int, ok bool) {
	if len(line) < 11 || line[8] != ' ' || line[len(line)-1] != '\n' {
		return nil, 0, 0, false
	}
	want, err := strconv.ParseUint(string(line[:8]), 16, 32)
	body = line[9 : len(line)-1]
	if err != nil || crc32.Checksum(body, crcTable) != uint32(want) {
		return nil, 0, 0, false
	}
	if body[0] == formatCompact {
		if len(body) < 3 || body[2] != '\t' {
			return nil, 0, 0, false
		}
		switch body[1] {
		case kindFinal:
			return body[2:], lineFinal, 2, true
		case kindProv:
			return body[2:], lineProvisional, 2, true
		case kindDelta:
			return body[2:], lineDelta, 2, true
		}
		return nil, 0, 0, false
	}
	switch body[0] {
	case 'P':
		return body[1:], lineProvisional, 1, true
	case 'D':
		return body[1:], lineDelta, 1, true
	}
	return body, lineFinal, 1, true
}

// decodeRecord parses one journal line of a whole record (with its
// newline) and reports whether it is a provisional record.
func decodeRecord(line []byte) (rec UsageRecord, provisional, ok bool) {
	body, kind, format, ok := checkLine(line)
	if !ok || kind == lineDelta || !decodeLine(body, kind, format, &rec) {
		return rec, false, false
	}
	return rec, kind == lineProvisional, true
}

// decodeLine decodes a line's body into rec: a whole record into a zero
// rec, a delta into its provisional record.
func decodeLine(body []byte, kind, format int, rec *UsageRecord) bool {
	if format == 1 {
		return json.Unmarshal(body, rec) == nil
	}
	return decodeCompact(body, kind, rec)
}

// lineID returns the ID a line's body names.
func lineID(body []byte, format int) (string, bool) {
	if format == 1 {
		var r struct {
			ID string `json:"id"`
		}
		err := json.Unmarshal(body, &r)
		return r.ID, err == nil
	}
	f := bytes.SplitN(body, []byte{'\t'}, 4) // "", time, id, rest
	if len(f) < 4 {
		return "", false
	}
	return unescapeCompact(f[2]), true
}
