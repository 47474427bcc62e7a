package store

import (
	"fmt"
	"runtime"
	"sync"
)

// jgroup is the lines of concurrent appenders, written with one write(2)
// by the group's leader: the appender whose line opened it.
type jgroup struct {
	buf        []byte
	lines      int64
	supersedes []uint64       // segments of provisional lines the group's provisional lines (retries) supersede
	waiters    []chan jresult // appenders (and Close) waiting for the group; [0] is the leader when it waits for its turn
}

// jresult tells a waiting appender that its group was written (to
// segment seg, or failed with err), or that it leads its group now.
type jresult struct {
	seg  uint64
	err  error
	lead bool
}

// waiters recycles the channels appenders wait on: each registration
// receives exactly one jresult.
var waiters = sync.Pool{New: func() any { return make(chan jresult, 1) }}

// lineBufs recycles encoding buffers: Append runs once per request.
var lineBufs = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// encodeRecord returns the journal line of rec, a whole final record.
func encodeRecord(rec *UsageRecord) ([]byte, error) {
	return appendRecordLine(nil, rec, lineFinal), nil
}

// Append writes rec to the journal (to the operating system, before it
// returns) and notes on rec which segment holds it, for [Journal.Done].
// When [Journal.AppendProvisional] wrote a line for rec, rec is written
// as a delta to that line, which stays a record of its segment until
// the store has rec ([UsageWriter] marks both done then), so that replay
// always finds the line the delta changes.
func (j *Journal) Append(rec *UsageRecord) error { return j.append(rec, false) }

// AppendProvisional writes a provisional line for rec: what is known of a
// request when the upstream's answer arrives (its key, status and the
// admission estimate), replayed only if the process dies before the final
// record with the same ID is stored. The line counts as a record of its
// segment until it is marked done once the store has the final record
// (see [Journal.Append]), or until a later AppendProvisional for rec (a
// retry) supersedes it.
func (j *Journal) AppendProvisional(rec *UsageRecord) error { return j.append(rec, true) }

// append encodes rec off the lock, adds its line to the filling group and
// waits until the group is written: by this caller when it opened the
// group (at once if no group is being written, else when the previous
// group's leader hands it over), by the group's leader otherwise. The
// caller returns only once its record is written, as without groups.
func (j *Journal) append(rec *UsageRecord, provisional bool) error {
	kind := lineFinal
	switch {
	case provisional:
		kind = lineProvisional
	case rec.pseg != 0:
		kind = lineDelta
	}
	bp := lineBufs.Get().(*[]byte)
	line := appendRecordLine((*bp)[:0], rec, kind)
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		putLineBuf(bp, line)
		return ErrJournalClosed
	}
	g := j.fill
	g.buf = append(g.buf, line...)
	g.lines++
	if provisional && rec.pseg != 0 {
		g.supersedes = append(g.supersedes, rec.pseg)
	}
	var seg uint64
	var err error
	if j.writing == nil {
		// Lead g. Yield once first: goroutines that are runnable now
		// (a busy server's other requests) join g meanwhile, so one
		// write(2) carries their records too; on an idle server the
		// yield returns at once.
		j.writing = g
		j.mu.Unlock()
		putLineBuf(bp, line)
		runtime.Gosched()
		j.mu.Lock()
		j.fill = j.newGroupLocked()
		seg, err = j.lead(g, nil)
	} else {
		ch := waiters.Get().(chan jresult)
		g.waiters = append(g.waiters, ch)
		j.mu.Unlock()
		putLineBuf(bp, line)
		r := <-ch
		if r.lead {
			j.mu.Lock()
			seg, err = j.lead(g, ch)
		} else {
			seg, err = r.seg, r.err
		}
		waiters.Put(ch)
	}
	if err != nil {
		return err
	}
	switch kind {
	case lineProvisional:
		rec.pseg = seg
		rec.prov = provStrings{requestID: rec.RequestID, teamID: rec.TeamID, tokenID: rec.TokenID,
			service: rec.Service, router: rec.Router, keyID: rec.KeyID, model: rec.Model}
	default:
		rec.seg = seg // a delta's provisional line stays until rec is stored
	}
	return nil
}

func putLineBuf(bp *[]byte, line []byte) {
	if cap(line) <= 64<<10 {
		*bp = line
		lineBufs.Put(bp)
	}
}

// lead writes g, which the caller leads (g is j.writing, no longer
// j.fill), tells g's waiters and hands the next group, if any has
// formed meanwhile, to its leader. The caller holds j.mu, which lead
// releases while writing and on return. self is the leader's own
// channel in g.waiters (nil when it led at once).
func (j *Journal) lead(g *jgroup, self chan jresult) (uint64, error) {
	if c := j.cur; c.bytes >= j.segBytes || (c.bytes > 0 && c.done >= c.appended && c.bytes >= j.segBytes/16) {
		// Full, or all stored and worth deleting. A failed rotation
		// keeps writing to the current file.
		if err := j.rotate(); err != nil {
			j.log.Warn("store: journal rotation failed; writing on to the current file", "err", err)
		}
	}
	s := j.cur
	j.mu.Unlock()
	n, err := s.f.Write(g.buf)
	j.mu.Lock()
	s.bytes += int64(n)
	s.appended += g.lines // a failed write's lines stay counted, never done: its file is kept for a replay
	j.dirty = true
	j.groups++
	j.lines += g.lines
	seg := s.seq
	if err != nil {
		if !j.failed {
			j.failed = true
			j.log.Error("store: journal write failed; usage records are not crash-safe until it works again", "err", err)
		}
		if n > 0 {
			// A partial line: start a new file so the next group does
			// not follow garbage (replay skips the torn line).
			_ = j.rotate()
		}
		seg, err = 0, fmt.Errorf("store: journal: %w", err)
	} else {
		j.failed = false
		for _, p := range g.supersedes {
			j.doneLocked(p, 1)
		}
	}
	for _, w := range g.waiters {
		if w != self {
			w <- jresult{seg: seg, err: err} // buffered: never blocks
		}
	}
	j.recycleLocked(g)
	if next := j.fill; next.lines > 0 {
		j.writing, j.fill = next, j.newGroupLocked()
		next.waiters[0] <- jresult{lead: true} // the appender that opened it
	} else {
		j.writing = nil
	}
	j.mu.Unlock()
	return seg, err
}

// newGroupLocked returns an empty group; the caller holds j.mu.
func (j *Journal) newGroupLocked() *jgroup {
	if n := len(j.free); n > 0 {
		g := j.free[n-1]
		j.free = j.free[:n-1]
		return g
	}
	return &jgroup{}
}

// recycleLocked keeps a written group for reuse; the caller holds j.mu.
func (j *Journal) recycleLocked(g *jgroup) {
	if cap(g.buf) > 1<<20 {
		g.buf = nil // an unusual burst: do not keep its buffer
	}
	g.buf, g.lines, g.supersedes = g.buf[:0], 0, g.supersedes[:0]
	clear(g.waiters)
	g.waiters = g.waiters[:0]
	if len(j.free) < 4 {
		j.free = append(j.free, g)
	}
}

// awaitGroupsLocked returns a channel that receives once every record
// accepted so far is written, or nil when none is pending; the caller
// holds j.mu and has set j.closed, so no record joins after.
func (j *Journal) awaitGroupsLocked() chan jresult {
	g := j.fill
	if g.lines == 0 {
		g = j.writing
	}
	if g == nil {
		return nil
	}
	ch := waiters.Get().(chan jresult)
	g.waiters = append(g.waiters, ch)
	return ch
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
	j.doneLocked(seg, int64(n))
}

// doneLocked is Done with j.mu held. While a group is being written the
// current segment is not rotated here; the next group's leader does it.
func (j *Journal) doneLocked(seg uint64, n int64) {
	s := j.segs[seg]
	if s == nil {
		return
	}
	s.done += n
	if s.done < s.appended {
		return
	}
	if s != j.cur {
		j.remove(s)
	} else if !j.closed && j.writing == nil && s.bytes >= j.segBytes/16 {
		_ = j.rotate()
	}
}
