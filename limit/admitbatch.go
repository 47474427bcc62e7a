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
// arguments. Due records are dropped and a counter's settled usage read
// once per batch; the batch's reservations are written at the end: one
// record and one due entry per admitted request that holds something
// (one HSET and one ZADD for the batch), and per counter one hold of
// what the batch reserved on it.
//
// KEYS: 6 per counter (counterKeys), then the due set, the records and
// the epoch key. ARGV: ttl ms, whether the epoch key must exist, number
// of specs, of shapes, of requests; per spec: its counter (1-based), n,
// then n × (window, warn, block); per shape: its number of charges, then
// per charge: spec (1-based), amount; per request: now ms, id, shape
// (1-based). Returns {which per request, per counter {reserved, hour,
// day, month, total, minute hash as HGETALL}} (a window not read is "";
// a counter no request reached is {}), or {-1} when the epoch key must
// exist and does not (nothing checked).
var reserveBatchScript = redis.NewScript(resvLua + `
local nk = #KEYS
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[nk]) == 0 then return {-1} end
local rv, rh = KEYS[nk - 2], KEYS[nk - 1]
local ttl = tonumber(ARGV[1])
local nspec, nshape, nreq = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local a = 6
local specs = {}
for s = 1, nspec do
  local n = tonumber(ARGV[a + 1])
  local sp = {(tonumber(ARGV[a]) - 1) * 6, n}
  for i = 0, n - 1 do
    local b = a + 2 + 3 * i
    sp[3 + 3 * i], sp[4 + 3 * i], sp[5 + 3 * i] = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  end
  specs[s] = sp
  a = a + 2 + 3 * n
end
local shapes = {}
for s = 1, nshape do
  local n = tonumber(ARGV[a])
  local sh, held, mask, body = {}, {}, {}, {}
  for c = 1, n do
    local b = a + 2 * c - 1
    local sp, amount = specs[tonumber(ARGV[b])], tonumber(ARGV[b + 1])
    sh[c] = sp
    if amount > 0 then
      held[#held + 1] = sp[1]
      held[#held + 1] = amount
      mask[c], body[2 * c - 1], body[2 * c] = 'h', ARGV[b + 1], KEYS[sp[1] + 6]
    else
      mask[c], body[2 * c - 1], body[2 * c] = '-', '', ''
    end
  end
  sh.held = held
  if #held > 0 then sh.rec = table.concat(mask) .. '\n' .. table.concat(body, '\0') .. '\0' end
  shapes[s] = sh
  a = a + 1 + 2 * n
end
local resv, rec, hash, mins = {}, {}, {}, {}
local function touch(kb)
  local rs = reservedOf(KEYS[kb + 6])
  resv[kb] = tonumber(rs)
  rec[kb] = {rs, '', '', '', '', {}}
  mins[kb] = {}
end
local function settled(kb, w)
  local r = rec[kb]
  if w == 1 then
    if not hash[kb] then
      r[6] = redis.call('HGETALL', KEYS[kb + 5])
      hash[kb] = true
    end
    return nil
  end
  if r[w] == '' then r[w] = redis.call('GET', KEYS[kb + w - 1]) or '0' end
  return tonumber(r[w])
end
local function minute(kb, sec)
  local v = mins[kb][sec]
  if v == nil then
    v = 0
    local h = rec[kb][6]
    for i = 1, #h, 2 do
      local s = tonumber(h[i])
      if s >= sec - 60 and s <= sec then v = v + tonumber(h[i + 1]) end
    end
    mins[kb][sec] = v
  end
  return v
end
dropDue(rv, rh, tonumber(ARGV[a]), ttl + 60000)
local which, sums, ns, zadd, hset = {}, {}, {}, {}, {}
for r = 1, nreq do
  local now, id, sh = tonumber(ARGV[a]), ARGV[a + 1], shapes[tonumber(ARGV[a + 2])]
  a = a + 3
  local sec = math.floor(now / 1000)
  local refused = 0
  for c = 1, #sh do
    local sp = sh[c]
    local kb = sp[1]
    if resv[kb] == nil then touch(kb) end
    local u = sp.u
    if u == nil then
      u = {}
      for i = 0, sp[2] - 1 do
        if sp[4 + 3 * i] > 0 or sp[5 + 3 * i] > 0 then u[i + 1] = settled(kb, sp[3 + 3 * i]) end
      end
      sp.u = u
    end
    local reserved = resv[kb]
    for i = 0, sp[2] - 1 do
      local bl = sp[5 + 3 * i]
      if bl > 0 then
        local x = u[i + 1]
        if x == nil then x = minute(kb, sec) end
        if x + reserved >= bl then
          refused = c
          break
        end
      end
    end
    if refused ~= 0 then break end
  end
  which[r] = refused
  if refused == 0 and sh.rec then
    local held = sh.held
    for i = 1, #held, 2 do
      local kb, amount = held[i], held[i + 1]
      resv[kb] = resv[kb] + amount
      sums[kb] = (sums[kb] or 0) + amount
      ns[kb] = (ns[kb] or 0) + 1
    end
    zadd[#zadd + 1] = now + ttl
    zadd[#zadd + 1] = id
    hset[#hset + 1] = id
    hset[#hset + 1] = sh.rec
  end
end
for i = 1, #zadd, 1000 do redis.call('ZADD', rv, unpack(zadd, i, math.min(i + 999, #zadd))) end
for i = 1, #hset, 1000 do redis.call('HSET', rh, unpack(hset, i, math.min(i + 999, #hset))) end
for kb, sum in pairs(sums) do hold(KEYS[kb + 6], sum, ns[kb], ttl) end
local recs = {}
for c = 1, (nk - 3) / 6 do recs[c] = rec[(c - 1) * 6] or {} end
return {which, recs}
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
	for ci, c := range sent {
		ctrOf[ci] = make([]int, len(c.charges))
		buf, specOf = buf[:0], specOf[:0]
		for i, ch := range c.charges {
			ck := ctrKey{ch.Key, calStart(Hour, c.now)}
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
		reqArgs = append(reqArgs, c.now.UnixMilli(), c.id, shape)
	}
	keys = append(keys, r.dueKey(), r.recordsKey(), r.epochKey())
	seed := 0
	if r.cfg.RequireSeed {
		seed = 1
	}
	args = make([]any, 0, 5+len(specArgs)+len(shapeArgs)+len(reqArgs))
	args = append(args, r.cfg.ReservationTTL.Milliseconds(), seed, len(specs), len(shapes), len(sent))
	args = append(append(append(args, specArgs...), shapeArgs...), reqArgs...)
	return keys, args, ctrOf
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
			r.orph.add(orphan{key: c.charges[i].Key, member: m, part: i, at: c.now})
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
	for i, ch := range charges {
		res[i] = Reservation{key: ch.Key, amount: ch.Amount, done: new(atomic.Bool)}
		if ch.Amount > 0 {
			res[i].recorded, res[i].member, res[i].part = true, c.id, i
		}
	}
	return -1, false, nil
}
