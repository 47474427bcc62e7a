package store

import (
	"fmt"
	"runtime"
)

// jgroup is the lines of concurrent appenders, written with one write(2)
// by the group's leader: the appender whose line opened it. A group that
// another appender joined is used once: its waiters read its result
// after done is closed. A lone line's group is reused.
type jgroup struct {
	buf        []byte
	lines      int64
	supersedes []uint64      // segments of provisional lines the group's provisional lines (retries) supersede
	done       chan struct{} // made when a second line joins; closed once the group is written, with seg and err set
	seg        uint64        // the segment the group was written to
	err        error         // the write's failure
}

// lineBufSize is the encoding buffer on an appender's stack: a line
// longer than that (unusually long ids or names) is encoded on the heap.
const lineBufSize = 512

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
// caller returns only once its record is written, as without groups. A
// group that no other line joined is written without a wakeup or an
// allocation.
func (j *Journal) append(rec *UsageRecord, provisional bool) error {
	kind := lineFinal
	switch {
	case provisional:
		kind = lineProvisional
	case rec.pseg != 0:
		kind = lineDelta
	}
	var lb [lineBufSize]byte
	line := appendUnsummedLine(lb[:0], rec, kind)
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return ErrJournalClosed
	}
	g := j.fill
	lead := g == nil
	if lead {
		g = j.newGroupLocked()
		j.fill = g
	} else if g.done == nil {
		g.done = make(chan struct{})
	}
	g.buf = append(g.buf, line...)
	g.lines++
	if provisional && rec.pseg != 0 {
		g.supersedes = append(g.supersedes, rec.pseg)
	}
	var seg uint64
	var err error
	switch {
	case lead && !j.writing:
		// Lead g. Yield once first: goroutines that are runnable now
		// (a busy server's other requests) join g meanwhile, so one
		// write(2) carries their records too (on the load harness,
		// about 12 lines a write instead of 1.2); on an idle server
		// the yield returns at once.
		j.writing = true
		j.mu.Unlock()
		runtime.Gosched()
		j.mu.Lock()
		j.fill = nil
		seg, err = j.lead(g)
	case lead:
		// Opened g while another group is written: lead g once that
		// one is done (its leader hands over through j.turn); lines
		// join g meanwhile.
		j.mu.Unlock()
		<-j.turn
		j.mu.Lock()
		j.fill = nil
		seg, err = j.lead(g)
	default:
		done := g.done
		j.mu.Unlock()
		<-done
		seg, err = g.seg, g.err
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

// lead writes g, which the caller leads (j.writing is set and g is no
// longer j.fill), hands over to the next group if one has formed
// meanwhile (its leader waits on j.turn) and tells g's waiters by
// closing g.done. The caller holds j.mu, which lead releases while
// writing and on return.
func (j *Journal) lead(g *jgroup) (uint64, error) {
	if c := j.cur; c.bytes >= j.segBytes || (c.bytes > 0 && c.done >= c.appended && c.bytes >= j.segBytes/16) {
		// Full, or all stored and worth deleting. A failed rotation
		// keeps writing to the current file.
		if err := j.rotate(); err != nil {
			j.log.Warn("store: journal rotation failed; writing on to the current file", "err", err)
		}
	}
	s := j.cur
	j.mu.Unlock()
	sumLines(g.buf)
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
	if j.fill != nil {
		j.turn <- struct{}{} // the next group's leader: j.writing stays set
	} else {
		j.writing = false
		if j.idle != nil {
			close(j.idle)
			j.idle = nil
		}
	}
	if g.done != nil {
		g.seg, g.err = seg, err
		close(g.done)
		j.recycleLocked(g.buf)
	} else {
		// Only its leader used g: keep it for the next lone line.
		g.buf, g.lines, g.supersedes = g.buf[:0], 0, g.supersedes[:0]
		if cap(g.buf) <= 1<<20 {
			j.spare = g
		}
	}
	j.mu.Unlock()
	return seg, err
}

// newGroupLocked returns an empty group: the spare one, or a new one
// with a written group's buffer when one is free; the caller holds j.mu.
func (j *Journal) newGroupLocked() *jgroup {
	if g := j.spare; g != nil {
		j.spare = nil
		return g
	}
	g := &jgroup{}
	if n := len(j.free); n > 0 {
		g.buf = j.free[n-1]
		j.free = j.free[:n-1]
	}
	return g
}

// recycleLocked keeps a written group's buffer for reuse; the caller
// holds j.mu. The group itself is not reused: its waiters read it.
func (j *Journal) recycleLocked(b []byte) {
	if cap(b) <= 1<<20 && len(j.free) < 4 { // an unusual burst's buffer is not kept
		j.free = append(j.free, b[:0])
	}
}

// awaitGroupsLocked returns a channel closed once every record accepted
// so far is written, or nil when none is pending; the caller holds j.mu
// and has set j.closed, so no record joins after.
func (j *Journal) awaitGroupsLocked() chan struct{} {
	if !j.writing {
		return nil
	}
	if j.idle == nil {
		j.idle = make(chan struct{})
	}
	return j.idle
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
	} else if !j.closed && !j.writing && s.bytes >= j.segBytes/16 {
		_ = j.rotate()
	}
}
