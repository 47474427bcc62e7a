package limit

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// reserveBatchScript is [Redis.ReserveAll] for a batch of requests, in
// their order: each request is checked on every charge and, when all
// admit, reserved on each, so a request sees the reservations of the
// requests before it in the batch exactly as if each had run its own
// script (the rule of [Limit]: admit while settled + reserved is below
// every block). The script only decides: it returns, per request, 0
// (admitted) or the 1-based charge that refused, and, per counter, what
// it read (reserved before the batch, settled usage per window); the
// client replays the batch to build each request's [Decision] from these
// (see admitReplay), so a request costs Redis a few comparisons and a
// reservation, not a reply of its own.
//
// What requests share is sent once per batch: the counters (6 keys
// each), the specs (a counter and its limits) and the shapes (the specs
// and amounts of a request's charges, and the record its reservations
// are kept in, see resvLua, built once per shape); a request is then 3
// arguments, its id, its shape and its second, used as strings (a shape
// and a second are looked up, not parsed). The due lists are taken and
// every counter's settled usage read once per batch.
//
// The check: for a spec, the reserved amounts that refuse a request are
// those at or above one bar (see bar: the least amount that the rule's
// sum refuses; the rule's sum is monotone in what is reserved), so a
// request's check is one comparison per charge. While the reserved sums
// cannot have reached any bar (by a bound on the sum of the batch's n
// reservations so far, rounding included: the guard), a request is
// admitted without even that; past the guard the sums are computed in
// the request order, as the client's replay computes them.
//
// The batch's reservations are written at the end: one record per
// admitted request that holds something (one HSET for the batch), the
// batch's list of them (one field and one due-set member, due at the
// batch's latest expiry) and per counter its new sum and count.
//
// KEYS: 6 per counter (counterKeys), then the due set, the records and
// the epoch key. ARGV: ttl ms, whether the epoch key must exist, number
// of specs, of shapes, of requests, the batch's latest time in ms, the
// name of its list (unique); per spec: its counter (1-based), n, then n
// × (window, warn, block); per shape: its number of charges, then per
// charge: spec (1-based), amount; per request: id, shape (1-based),
// time in s. Returns {which per request, per counter {reserved, hour,
// day, month, total, minute hash as HGETALL}} (a window not read is ""),
// or {-1} when the epoch key must exist and does not (nothing checked).
var reserveBatchScript = redis.NewScript(resvLua + `
local argv, keys = ARGV, KEYS
local nk = #keys
if argv[2] == '1' and redis.call('EXISTS', keys[nk]) == 0 then return {-1} end
local rv, rh = keys[nk - 2], keys[nk - 1]
local ttl, latest = tonumber(argv[1]), tonumber(argv[6])
local nspec, nshape, nreq = tonumber(argv[3]), tonumber(argv[4]), tonumber(argv[5])
dropDue(rv, rh, latest, ttl + 60000)
local a = 8
local specs, ctrs = {}, {}
for s = 1, nspec do
  local n = tonumber(argv[a + 1])
  local kb = (tonumber(argv[a]) - 1) * 6
  local sp = {kb, n}
  for i = 0, n - 1 do
    local b = a + 2 + 3 * i
    sp[3 + 3 * i], sp[4 + 3 * i], sp[5 + 3 * i] = tonumber(argv[b]), tonumber(argv[b + 1]), tonumber(argv[b + 2])
  end
  specs[s] = sp
  if not ctrs[kb] then ctrs[kb] = {amax = 0, mins = {}} end
  a = a + 2 + 3 * n
end
local shapes, recOf = {}, {}
for s = 1, nshape do
  local n = tonumber(argv[a])
  local sh, held, mask, body = {}, {}, {}, {}
  for c = 1, n do
    local b = a + 2 * c - 1
    local sp, amount = specs[tonumber(argv[b])], tonumber(argv[b + 1])
    sh[c] = sp
    if amount > 0 then
      held[#held + 1] = sp[1]
      held[#held + 1] = amount
      mask[c], body[2 * c - 1], body[2 * c] = 'h', argv[b + 1], keys[sp[1] + 6]
      if amount > ctrs[sp[1]].amax then ctrs[sp[1]].amax = amount end
    else
      mask[c], body[2 * c - 1], body[2 * c] = '-', '', ''
    end
  end
  sh.held, sh.k = held, 0
  if #held > 0 then
    sh.rec = table.concat(mask) .. '\n' .. table.concat(body, '\0') .. '\0'
    recOf[sh.rec] = held
  end
  shapes[tostring(s)] = sh
  a = a + 1 + 2 * n
end
-- Every counter's sums and reserved key, in one MGET.
local kbs, mk = {}, {}
for kb in pairs(ctrs) do
  kbs[#kbs + 1] = kb
  for i = 1, 4 do mk[#mk + 1] = keys[kb + i] end
  mk[#mk + 1] = keys[kb + 6]
end
local got = redis.call('MGET', unpack(mk))
local resv, rec = {}, {}
for i, kb in ipairs(kbs) do
  local b, ct = 5 * (i - 1), ctrs[kb]
  ct.n0, ct.rs = parseResv(got[b + 5])
  if tonumber(ct.rs) < 0 then ct.rs = '0' end
  ct.r0 = tonumber(ct.rs)
  resv[kb] = ct.r0
  rec[kb] = {ct.rs, got[b + 1] or '0', got[b + 2] or '0', got[b + 3] or '0', got[b + 4] or '0', {}}
end
local function minute(kb, sec)
  local ct = ctrs[kb]
  if not ct.hash then
    rec[kb][6] = redis.call('HGETALL', keys[kb + 5])
    ct.hash = true
  end
  local v = ct.mins[sec]
  if v == nil then
    v = 0
    local h = rec[kb][6]
    for i = 1, #h, 2 do
      local s = tonumber(h[i])
      if s >= sec - 60 and s <= sec then v = v + tonumber(h[i + 1]) end
    end
    ct.mins[sec] = v
  end
  return v
end
local function down(t)
  local m, e = math.frexp(t)
  if m == 0.5 then e = e - 1 end
  return t - math.max(2 ^ (e - 53), 2 ^ -1074)
end
-- bar(x, bl) is the least reserved r >= 0 that the rule refuses with
-- settled usage x under block bl (x + r >= bl, summed as the rule sums):
-- the sum is monotone in r, so r refuses if and only if r >= bar.
local function bar(x, bl)
  if x >= bl then return 0 end
  local hi = bl - x
  while x + hi < bl do hi = hi + hi end
  local lo = down(hi)
  if lo < 0 or x + lo < bl then return hi end
  lo, hi = 0, lo
  while true do
    local mid = lo + (hi - lo) / 2
    if mid <= lo or mid >= hi then return hi end
    if x + mid >= bl then hi = mid else lo = mid end
  end
end
-- bars(sec) sets each spec's bar for requests at sec (sp.t, math.huge
-- without a block) and returns the guard: how many reservations the
-- batch may hold in all before a counter's sum may reach the lowest bar
-- on it (-1: one is there already).
local function bars(sec)
  local low = {}
  for _, sp in ipairs(specs) do
    local kb, t = sp[1], math.huge
    for i = 0, sp[2] - 1 do
      local w, bl = sp[3 + 3 * i], sp[5 + 3 * i]
      if w == 1 and (bl > 0 or sp[4 + 3 * i] > 0) then minute(kb, sec) end
      if bl > 0 then
        local x
        if w == 1 then x = minute(kb, sec) else x = tonumber(rec[kb][w]) end
        t = math.min(t, bar(x, bl))
      end
    end
    sp.t = t
    low[kb] = math.min(low[kb] or math.huge, t)
  end
  local g = math.huge
  for kb, t in pairs(low) do
    local ct = ctrs[kb]
    if ct.r0 >= t then return -1 end
    if t < math.huge and ct.amax > 0 then
      local m = math.floor((t / (1 + 1e-12) - ct.r0) / ct.amax)
      while m >= 0 and (ct.r0 + m * ct.amax) * (1 + 1e-12) >= t do m = m - 1 end
      if m < g then g = m end
    end
  end
  return g
end
local which, hset = {}, {}
local n, nh, guard, csec, first = 0, 0, 0, nil, nreq + 1
for r = 1, nreq do
  local sh, s = shapes[argv[a + 1]], argv[a + 2]
  if s ~= csec then
    csec = s
    guard = bars(tonumber(s))
  end
  local refused = 0
  if first <= nreq or n > guard then
    if first > nreq then
      first = r
      for i = 2, nh, 2 do
        local held = recOf[hset[i]]
        for j = 1, #held, 2 do resv[held[j]] = resv[held[j]] + held[j + 1] end
      end
    end
    for c = 1, #sh do
      local sp = sh[c]
      if resv[sp[1]] >= sp.t then
        refused = c
        break
      end
    end
    if refused == 0 then
      local held = sh.held
      for j = 1, #held, 2 do resv[held[j]] = resv[held[j]] + held[j + 1] end
    end
    which[r - first + 1] = refused
  end
  if refused == 0 then
    local rc = sh.rec
    if rc then
      n, nh = n + 1, nh + 2
      hset[nh - 1], hset[nh] = argv[a], rc
      sh.k = sh.k + 1
    end
  end
  a = a + 3
end
if n > 0 then
  setAll(rh, 'HSET', hset)
  local list = {}
  for i = 1, n do list[i] = hset[2 * i - 1] end
  redis.call('HSET', rh, argv[7], table.concat(list, ','))
  redis.call('ZADD', rv, latest + ttl, argv[7])
  local cnt = {}
  for _, sh in pairs(shapes) do
    if sh.k > 0 then
      local held = sh.held
      for j = 1, #held, 2 do
        local kb = held[j]
        cnt[kb] = (cnt[kb] or 0) + sh.k
        if first > nreq then resv[kb] = resv[kb] + sh.k * held[j + 1] end
      end
    end
  end
  for kb, k in pairs(cnt) do
    redis.call('SET', keys[kb + 6], (ctrs[kb].n0 + k) .. ' ' .. string.format('%.17g', resv[kb]), 'PX', ttl + 60000)
  end
end
local recs = {}
for c = 1, (nk - 3) / 6 do recs[c] = rec[(c - 1) * 6] or {} end
return {first, which, recs}
`)

// maxAdmitBatch is the most requests one batch admits in one script run:
// a run of this many takes Redis about a millisecond, and the next batch
// is built and sent meanwhile (see maxAdmitInFlight).
const maxAdmitBatch = 128

// maxAdmitInFlight is how many admission batches of one [Redis] may be in
// flight at once: while Redis runs one, the next is built, sent and
// queued behind it (pipelined), so Redis does not wait for the client
// between batches.
const maxAdmitInFlight = 3

// admitCall is one [Redis.ReserveAll] in an admission batch. Everything
// the batch reads is the call's own (copied before it is queued), so a
// caller that leaves does not race with the batch.
type admitCall struct {
	callState
	charges []Charge // a copy of the caller's
	now     time.Time
	id      string // the request's reservations record (see resvLua)
	sent    bool   // set by the batch that sends it

	// Set by the batch when the backend traces admissions (traceAdmit).
	sentAt, repliedAt time.Time

	// Set by the batch before done is closed.
	which    int        // 0: admitted, else the 1-based charge that refused
	reserved []float64  // per charge checked: reserved on its counter before the request
	ctrs     []*ctrRead // per charge checked: what the script read of its counter
	unseeded bool
	err      error
}

func (r *Redis) newAdmitCall(charges []Charge, now time.Time) *admitCall {
	return &admitCall{callState: newCallState(), charges: append([]Charge(nil), charges...), now: now,
		id: strconv.FormatUint(r.newID(), 10)}
}

// member is the record of the reservation the call holds on charge i
// ("" for none).
func (c *admitCall) member(i int) string {
	if c.charges[i].Amount <= 0 {
		return ""
	}
	return c.id
}

// admitFull reports whether an admission batch is full.
func admitFull(batch []*admitCall) bool { return len(batch) >= maxAdmitBatch }

// ctrKey is a counter in a batch: its key and its hour (the hour, day and
// month keys follow from it).
type ctrKey struct {
	key  string
	hour int64
}

// specKey is a spec in a batch: a counter and its limits (by identity:
// requests of one scope share the scope's slice).
type specKey struct {
	ctr int
	lim *Limit
	n   int
}

// batchArgs builds reserveBatchScript's keys and arguments for the calls
// of sent, and returns, per call, the counter (0-based) of each charge.
func (r *Redis) batchArgs(sent []*admitCall) (keys []string, args []any, ctrOf [][]int) {
	ctrs := map[ctrKey]int{}
	specs := map[specKey]int{}
	shapes := map[string]int{}
	var specArgs, shapeArgs []any
	reqArgs := make([]any, 0, 3*len(sent))
	ctrOf = make([][]int, len(sent))
	var buf []byte
	var specOf []int
	latest := int64(math.MinInt64)
	// A call whose charges are the previous call's (a burst of one
	// token's requests) shares its shape and counters.
	var prev *admitCall
	var prevHour int64
	var prevShape int
	sec, secArg := int64(math.MinInt64), any(nil)
	for ci, c := range sent {
		latest = max(latest, c.now.UnixMilli())
		if s := c.now.Unix(); s != sec {
			sec, secArg = s, s // boxed once per second
		}
		hour := calStart(Hour, c.now)
		if prev != nil && hour == prevHour && sameCharges(prev.charges, c.charges) {
			ctrOf[ci] = ctrOf[ci-1]
			reqArgs = append(reqArgs, c.id, prevShape, secArg)
			continue
		}
		prev, prevHour = c, hour
		ctrOf[ci] = make([]int, len(c.charges))
		buf, specOf = buf[:0], specOf[:0]
		for i, ch := range c.charges {
			ck := ctrKey{ch.Key, hour}
			ctr, ok := ctrs[ck]
			if !ok {
				ctr = len(ctrs)
				ctrs[ck] = ctr
				keys = r.appendCounterKeys(keys, ch.Key, c.now)
			}
			ctrOf[ci][i] = ctr
			sk := specKey{ctr: ctr, n: len(ch.Limits)}
			if len(ch.Limits) > 0 {
				sk.lim = &ch.Limits[0]
			}
			spec, ok := specs[sk]
			if !ok {
				spec = len(specs) + 1
				specs[sk] = spec
				specArgs = append(specArgs, ctr+1, len(ch.Limits))
				for _, l := range ch.Limits {
					specArgs = append(specArgs, int(l.Window), l.Warn, l.Block)
				}
			}
			specOf = append(specOf, spec)
			buf = binary.AppendUvarint(buf, uint64(spec))
			buf = binary.LittleEndian.AppendUint64(buf, math.Float64bits(ch.Amount))
		}
		shape, ok := shapes[string(buf)]
		if !ok {
			shape = len(shapes) + 1
			shapes[string(buf)] = shape
			shapeArgs = append(shapeArgs, len(c.charges))
			for i, ch := range c.charges {
				shapeArgs = append(shapeArgs, specOf[i], strconv.FormatFloat(ch.Amount, 'g', -1, 64))
			}
		}
		prevShape = shape
		reqArgs = append(reqArgs, c.id, shape, secArg)
	}
	keys = append(keys, r.dueKey(), r.recordsKey(), r.epochKey())
	seed := 0
	if r.cfg.RequireSeed {
		seed = 1
	}
	args = make([]any, 0, 7+len(specArgs)+len(shapeArgs)+len(reqArgs))
	args = append(args, r.cfg.ReservationTTL.Milliseconds(), seed, len(specs), len(shapes), len(sent), latest,
		"#b"+sent[0].id)
	args = append(append(append(args, specArgs...), shapeArgs...), reqArgs...)
	return keys, args, ctrOf
}

// sameCharges reports whether a and b charge the same counters the same
// amounts under the same limits (by identity, as specKey).
func sameCharges(a, b []Charge) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := &a[i], &b[i]
		if x.Key != y.Key || x.Amount != y.Amount || len(x.Limits) != len(y.Limits) ||
			len(x.Limits) > 0 && &x.Limits[0] != &y.Limits[0] {
			return false
		}
	}
	return true
}

// admitBatch runs reserveBatchScript once for the calls of batch whose
// callers still wait, and delivers each its outcome. A call whose caller
// left is released (its reservations queued for release at 0) if the
// script admitted it or may have; so is every call of a batch whose
// script may have run but whose reply was lost.
func (r *Redis) admitBatch(batch []*admitCall) {
	sent := make([]*admitCall, 0, len(batch))
	for _, c := range batch {
		if !c.gone() {
			sent = append(sent, c)
			c.sent = true
		}
	}
	if len(sent) > 0 {
		var sentAt time.Time
		if r.traceAdmit != nil {
			sentAt = time.Now()
		}
		keys, args, ctrOf := r.batchArgs(sent)
		err := r.run(r.ctx, "reserve", func(cctx context.Context) error {
			out, err := reserveBatchScript.Run(cctx, r.c, keys, args...).Slice()
			if err == nil {
				err = admitReplay(out, sent, ctrOf)
			}
			return err
		})
		if err != nil && !errors.Is(err, ErrUnavailable) {
			// The backend is closed (r.ctx done): the fail policy.
			err = fmt.Errorf("%w: reserve: %w", ErrUnavailable, err)
		}
		if err != nil {
			for _, c := range sent {
				c.which, c.unseeded, c.err = 0, false, err
			}
		}
		if r.traceAdmit != nil {
			replied := time.Now()
			for _, c := range sent {
				c.sentAt, c.repliedAt = sentAt, replied
			}
		}
	}
	for _, c := range batch {
		if c.deliver() || !c.sent {
			continue
		}
		// The caller left: release what the script holds for it.
		if c.err != nil && (errors.Is(c.err, gobreaker.ErrOpenState) || errors.Is(c.err, gobreaker.ErrTooManyRequests)) {
			continue // nothing was sent
		}
		if c.err == nil && (c.unseeded || c.which != 0) {
			continue // refused or unseeded: nothing held
		}
		c.release(r)
	}
}

// release queues c's reservations for release at 0 (see orphans).
func (c *admitCall) release(r *Redis) {
	for i := range c.charges {
		if m := c.member(i); m != "" {
			r.orph.add(orphan{key: c.charges[i].Key, member: m, part: i, held: c.charges[i].Amount, at: c.now})
		}
	}
}

// reserveAll admits charges in the next admission batch (one script run
// for the requests that arrive while earlier batches are in flight).
// unseeded reports that Redis holds no epoch key (with RequireSeed):
// nothing was checked.
func (r *Redis) reserveAll(ctx context.Context, charges []Charge, res []Reservation, ds []Decision, now time.Time) (which int, unseeded bool, err error) {
	c := r.newAdmitCall(charges, now)
	var queued time.Time
	if r.traceAdmit != nil {
		queued = time.Now()
	}
	r.admits.submit(c)
	select {
	case <-c.done:
	case <-ctx.Done():
		if c.leave() {
			return -1, false, ctx.Err()
		}
		<-c.done
	}
	if r.traceAdmit != nil && c.sent {
		r.traceAdmit(c.sentAt.Sub(queued), c.repliedAt.Sub(c.sentAt), time.Since(c.repliedAt))
	}
	if c.err != nil {
		if !errors.Is(c.err, gobreaker.ErrOpenState) && !errors.Is(c.err, gobreaker.ErrTooManyRequests) {
			// The script may have run and reserved: release what it
			// may hold once Redis answers.
			c.release(r)
		}
		if ctx.Err() != nil {
			return -1, false, ctx.Err()
		}
		return -1, false, c.err
	}
	if c.unseeded {
		return -1, true, nil
	}
	rooms, err := c.decide(ds, r.cfg.FailLocalBudget)
	if err != nil {
		if c.which == 0 {
			c.release(r)
		}
		return -1, false, fmt.Errorf("%w: reserve: %w", ErrUnavailable, err)
	}
	if r.cfg.FailLocalBudget {
		r.share.seen(charges, rooms)
	}
	if c.which != 0 {
		return c.which - 1, false, nil
	}
	c.reservations(res)
	return -1, false, nil
}

// reservations fills res with the admitted call's reservations (their
// settled flags in one allocation).
func (c *admitCall) reservations(res []Reservation) {
	done := make([]atomic.Bool, len(c.charges))
	for i, ch := range c.charges {
		res[i] = Reservation{key: ch.Key, amount: ch.Amount, done: &done[i]}
		if ch.Amount > 0 {
			res[i].recorded, res[i].member, res[i].part = true, c.id, i
		}
	}
}
