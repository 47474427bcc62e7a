package keypool

import "time"

// The wait heap: a binary min-heap of the keys waiting for a time
// (keyState.wakeAt), indexed by keyState.heapIdx, under the service's lock.

// schedule puts c on the heap to wake at t, or moves it there.
func (s *svcState) schedule(c *keyState, t time.Time) {
	if c.heapIdx >= 0 {
		c.wakeAt = t
		s.heapFix(c.heapIdx)
		return
	}
	c.wakeAt = t
	c.heapIdx = len(s.heap)
	s.heap = append(s.heap, c)
	s.heapUp(c.heapIdx)
}

// unschedule takes c off the heap, if it is on it.
func (s *svcState) unschedule(c *keyState) {
	i := c.heapIdx
	if i < 0 {
		return
	}
	last := len(s.heap) - 1
	if i != last {
		s.heapSwap(i, last)
	}
	s.heap[last] = nil
	s.heap = s.heap[:last]
	c.heapIdx = -1
	if i != last {
		s.heapFix(i)
	}
}

func (s *svcState) heapFix(i int) {
	if !s.heapDown(i) {
		s.heapUp(i)
	}
}

func (s *svcState) heapSwap(i, j int) {
	h := s.heap
	h[i], h[j] = h[j], h[i]
	h[i].heapIdx = i
	h[j].heapIdx = j
}

func (s *svcState) heapUp(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if !s.heap[i].wakeAt.Before(s.heap[parent].wakeAt) {
			return
		}
		s.heapSwap(i, parent)
		i = parent
	}
}

func (s *svcState) heapDown(i int) bool {
	start, n := i, len(s.heap)
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		m := l
		if r := l + 1; r < n && s.heap[r].wakeAt.Before(s.heap[l].wakeAt) {
			m = r
		}
		if !s.heap[m].wakeAt.Before(s.heap[i].wakeAt) {
			break
		}
		s.heapSwap(i, m)
		i = m
	}
	return i > start
}
