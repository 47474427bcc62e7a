package sqlstore

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/keypool/keypool/store"
)

// usageBatch is how many usage rows go into one INSERT.
const usageBatch = 1000

// AppendUsage inserts usage records in batches, in one transaction. A
// record with a zero Time is stamped now. A record whose ID is already
// stored is skipped (ON CONFLICT DO NOTHING on the unique record_id), so
// appending the same records twice stores them once; the KeySpend of the
// records actually inserted is added to their keys' balance_used in the
// same transaction. Usage rows have no foreign keys: they outlive the
// teams, tokens and keys they name.
func (s *Store) AppendUsage(ctx context.Context, recs []store.UsageRecord) error {
	if len(recs) == 0 {
		return nil
	}
	now := s.now()
	rows := make([]usageRow, len(recs))
	spending := false
	for i := range recs {
		r := &recs[i]
		t := r.Time
		if t.IsZero() {
			t = now
		}
		rows[i] = usageRow{
			Ts: t.UnixMicro(), RequestID: r.RequestID, TeamID: r.TeamID, TokenID: r.TokenID,
			Service: r.Service, Router: r.Router, KeyID: r.KeyID, Model: r.Model, Status: r.Status,
			TokensIn: r.TokensIn, TokensOut: r.TokensOut, CachedTokens: r.CachedTokens,
			Cost: r.Cost, LatencyMS: r.LatencyMS,
		}
		if r.ID != "" {
			rows[i].RecordID = &r.ID
		}
		if r.KeySpend != 0 && r.KeyID != "" {
			spending = true
		}
	}
	return s.write(ctx, "append usage", false, func(tx *gorm.DB) error {
		boxed := boxes{}
		var spend map[string]float64
		if spending {
			var err error
			if spend, err = s.newSpend(ctx, tx, recs, boxed); err != nil {
				return err
			}
		}
		if sqlTx, ok := tx.Statement.ConnPool.(*sql.Tx); ok {
			if err := s.insertUsage(ctx, sqlTx, rows, boxed); err != nil {
				return err
			}
		} else if err := tx.Clauses(clause.OnConflict{Columns: []clause.Column{{Name: "record_id"}}, DoNothing: true}).
			CreateInBatches(&rows, usageBatch).Error; err != nil {
			return err
		}
		for id, amt := range spend {
			if err := tx.Exec("UPDATE keys SET balance_used = balance_used + ? WHERE id = ?", amt, id).Error; err != nil {
				return err
			}
		}
		return nil
	})
}

// spendLookup is how many record ids one existence query carries.
const spendLookup = 500

// newSpend sums, per key, the KeySpend of the records in recs that are not
// stored yet (called in the inserting transaction, before the insert). A
// negative KeySpend is derived from the key's balance unit.
func (s *Store) newSpend(ctx context.Context, tx *gorm.DB, recs []store.UsageRecord, boxed boxes) (map[string]float64, error) {
	var ids, byUnit []string
	for i := range recs {
		if r := &recs[i]; r.KeySpend != 0 && r.KeyID != "" {
			if r.ID != "" {
				ids = append(ids, r.ID)
			}
			if r.KeySpend < 0 && !slices.Contains(byUnit, r.KeyID) {
				byUnit = append(byUnit, r.KeyID)
			}
		}
	}
	stored, err := s.storedRecords(ctx, tx, ids, boxed)
	if err != nil {
		return nil, err
	}
	units := map[string]string{}
	for len(byUnit) > 0 {
		n := min(len(byUnit), spendLookup)
		var rows []struct {
			ID          string
			BalanceUnit string
		}
		if err := tx.Raw("SELECT id, balance_unit FROM keys WHERE id IN ?", byUnit[:n]).Scan(&rows).Error; err != nil {
			return nil, err
		}
		for _, r := range rows {
			units[r.ID] = r.BalanceUnit
		}
		byUnit = byUnit[n:]
	}
	spend := map[string]float64{}
	seen := map[string]bool{}
	for i := range recs {
		r := &recs[i]
		if r.KeySpend == 0 || r.KeyID == "" || stored[r.ID] {
			continue
		}
		if r.ID != "" {
			if seen[r.ID] {
				continue // the same record twice in one batch is stored once
			}
			seen[r.ID] = true
		}
		amt := r.KeySpend
		if amt < 0 {
			amt = unitSpend(units[r.KeyID], r)
		}
		if amt > 0 {
			spend[r.KeyID] += amt
		}
	}
	return spend, nil
}

// unitSpend is what r spent of a key whose balance is counted in unit.
func unitSpend(unit string, r *store.UsageRecord) float64 {
	switch strings.ToLower(unit) {
	case "usd", "$", "dollars":
		return r.Cost
	case "tokens", "token":
		return float64(r.TokensIn + r.TokensOut)
	case "requests", "request", "calls":
		if r.Status >= 200 && r.Status < 300 {
			return 1
		}
	}
	return 0
}

// storedRecords returns which of ids are stored already. In a database/sql
// transaction it queries without gorm (whose Scan renders the statement
// with every argument, for its logger) and passes each id as the argument
// the insert then reuses.
func (s *Store) storedRecords(ctx context.Context, tx *gorm.DB, ids []string, boxed boxes) (map[string]bool, error) {
	stored := map[string]bool{}
	sqlTx, direct := tx.Statement.ConnPool.(*sql.Tx)
	var (
		q    []byte
		args []any
		id   sql.RawBytes
	)
	for len(ids) > 0 {
		n := min(len(ids), spendLookup)
		if !direct {
			var found []string
			if err := tx.Raw("SELECT record_id FROM usage_records WHERE record_id IN ?", ids[:n]).Scan(&found).Error; err != nil {
				return nil, err
			}
			for _, id := range found {
				stored[id] = true
			}
			ids = ids[n:]
			continue
		}
		q = append(q[:0], "SELECT record_id FROM usage_records WHERE record_id IN ("...)
		args = args[:0]
		for i := range ids[:n] {
			if i > 0 {
				q = append(q, ',')
			}
			q = s.placeholder(q, i+1)
			args = append(args, boxed.of(ids[i]))
		}
		q = append(q, ')')
		rows, err := sqlTx.QueryContext(ctx, string(q), args...)
		if err != nil {
			return nil, err
		}
		for rows.Next() {
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return nil, err
			}
			stored[string(id)] = true
		}
		if err := rows.Close(); err != nil {
			return nil, err
		}
		if err := rows.Err(); err != nil {
			return nil, err
		}
		ids = ids[n:]
	}
	return stored, nil
}

// placeholder appends the n-th (from 1) statement parameter's marker.
func (s *Store) placeholder(q []byte, n int) []byte {
	if s.kind == kindPostgres {
		return strconv.AppendInt(append(q, '$'), int64(n), 10)
	}
	return append(q, '?')
}

// usageChunk is how many rows one prepared multi-row INSERT carries.
const usageChunk = 64

const usageColumns = 15

// usageStmts holds the prepared usage INSERTs: parsing a statement costs
// more than the rows it inserts, so it is prepared once, when the Store
// opens (on SQLite, preparing inside a write transaction would wait for
// the one writer connection that transaction holds).
type usageStmts struct {
	once       sync.Once
	chunk, one *sql.Stmt
	err        error
}

func (s *Store) prepareUsage(ctx context.Context) error {
	u := &s.usageStmts
	u.once.Do(func() {
		if u.chunk, u.err = s.wsql.PrepareContext(ctx, s.usageInsertSQL(usageChunk)); u.err != nil {
			return
		}
		u.one, u.err = s.wsql.PrepareContext(ctx, s.usageInsertSQL(1))
	})
	return u.err
}

func (s *Store) usageInsertSQL(rows int) string {
	var b strings.Builder
	b.WriteString("INSERT INTO usage_records (ts, record_id, request_id, team_id, token_id, service, router, key_id, model, status, tokens_in, tokens_out, cached_tokens, cost, latency_ms) VALUES ")
	n := 0
	for r := 0; r < rows; r++ {
		if r > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('(')
		for c := 0; c < usageColumns; c++ {
			if c > 0 {
				b.WriteByte(',')
			}
			n++
			b.Write(s.placeholder(nil, n))
		}
		b.WriteByte(')')
	}
	b.WriteString(" ON CONFLICT (record_id) DO NOTHING")
	return b.String()
}

// insertUsage writes rows through the prepared statements, usageChunk
// rows at a time.
func (s *Store) insertUsage(ctx context.Context, tx *sql.Tx, rows []usageRow, boxed boxes) error {
	if s.usageStmts.chunk == nil || s.usageStmts.one == nil {
		return fmt.Errorf("usage insert not prepared (schema older than this build?)")
	}
	args := make([]any, 0, usageChunk*usageColumns)
	add := func(r *usageRow) {
		var id any
		if r.RecordID != nil {
			id = boxed.of(*r.RecordID)
		}
		args = append(args, r.Ts, id, r.RequestID, boxed.of(r.TeamID), boxed.of(r.TokenID), boxed.of(r.Service),
			boxed.of(r.Router), boxed.of(r.KeyID), boxed.of(r.Model), r.Status, r.TokensIn, r.TokensOut, r.CachedTokens, r.Cost, r.LatencyMS)
	}
	if len(rows) >= usageChunk {
		chunk := tx.StmtContext(ctx, s.usageStmts.chunk)
		defer chunk.Close()
		for len(rows) >= usageChunk {
			args = args[:0]
			for i := range rows[:usageChunk] {
				add(&rows[i])
			}
			if _, err := chunk.ExecContext(ctx, args...); err != nil {
				return err
			}
			rows = rows[usageChunk:]
		}
	}
	if len(rows) > 0 {
		one := tx.StmtContext(ctx, s.usageStmts.one)
		defer one.Close()
		for i := range rows {
			args = args[:0]
			add(&rows[i])
			if _, err := one.ExecContext(ctx, args...); err != nil {
				return err
			}
		}
	}
	return nil
}

// boxes holds one write's string statement arguments: the strings that
// repeat across its rows (team, token, service, key, model) and the record
// ids its existence query and its insert both pass, so each distinct value
// is converted to an interface once per write instead of once per use.
type boxes map[string]any

// of returns s as an argument, the same interface value for equal strings.
func (b boxes) of(s string) any {
	if s == "" {
		return "" // a constant: converting it allocates nothing
	}
	v, ok := b[s]
	if !ok {
		v = s
		b[s] = v
	}
	return v
}

// groupColumn returns the SQL expression of a grouping dimension.
func (s *Store) groupColumn(dim string) (string, bool) {
	switch dim {
	case store.GroupTeam:
		return "team_id", true
	case store.GroupToken:
		return "token_id", true
	case store.GroupService:
		return "service", true
	case store.GroupRouter:
		return "router", true
	case store.GroupKey:
		return "key_id", true
	case store.GroupModel:
		return "model", true
	case store.GroupDay:
		if s.kind == kindPostgres {
			return "to_char(to_timestamp(ts / 1000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')", true
		}
		return "strftime('%Y-%m-%d', ts / 1000000, 'unixepoch')", true
	}
	return "", false
}

// QueryUsage sums usage per group, in SQL. Days are UTC. Rows are ordered
// by their group values; with no GroupBy there is one row (none when no
// record matches).
func (s *Store) QueryUsage(ctx context.Context, q store.UsageQuery) ([]store.UsageRow, error) {
	var (
		cols []string
		seen = map[string]bool{}
	)
	for _, dim := range q.GroupBy {
		c, ok := s.groupColumn(dim)
		if !ok {
			return nil, fmt.Errorf("sqlstore: query usage: %w: unknown group_by %q", store.ErrInvalid, dim)
		}
		if seen[dim] {
			return nil, fmt.Errorf("sqlstore: query usage: %w: group_by %q given twice", store.ErrInvalid, dim)
		}
		seen[dim] = true
		cols = append(cols, c)
	}
	var (
		where []string
		args  []any
	)
	for _, f := range []struct{ col, val string }{
		{"team_id", q.Team}, {"token_id", q.Token}, {"service", q.Service}, {"key_id", q.Key}, {"model", q.Model},
	} {
		if f.val != "" {
			where = append(where, f.col+" = ?")
			args = append(args, f.val)
		}
	}
	if !q.Since.IsZero() {
		where = append(where, "ts >= ?")
		args = append(args, q.Since.UnixMicro())
	}
	if !q.Until.IsZero() {
		where = append(where, "ts < ?")
		args = append(args, q.Until.UnixMicro())
	}
	var b strings.Builder
	b.WriteString("SELECT ")
	for i, c := range cols {
		fmt.Fprintf(&b, "%s AS g%d, ", c, i)
	}
	b.WriteString("COUNT(*), CAST(COALESCE(SUM(tokens_in), 0) AS BIGINT), CAST(COALESCE(SUM(tokens_out), 0) AS BIGINT), " +
		"CAST(COALESCE(SUM(cost), 0) AS DOUBLE PRECISION) FROM usage_records")
	if len(where) > 0 {
		b.WriteString(" WHERE " + strings.Join(where, " AND "))
	}
	if len(cols) > 0 {
		pos := make([]string, len(cols))
		for i := range cols {
			pos[i] = fmt.Sprintf("g%d", i)
		}
		b.WriteString(" GROUP BY " + strings.Join(pos, ", ") + " ORDER BY " + strings.Join(pos, ", "))
	}
	rows, err := s.r.WithContext(ctx).Raw(b.String(), args...).Rows()
	if err != nil {
		return nil, mapErr("query usage", err)
	}
	defer rows.Close()
	out := []store.UsageRow{}
	groups := make([]sql.NullString, len(cols))
	dest := make([]any, 0, len(cols)+4)
	for i := range groups {
		dest = append(dest, &groups[i])
	}
	var r store.UsageRow
	dest = append(dest, &r.Requests, &r.TokensIn, &r.TokensOut, &r.Cost)
	for rows.Next() {
		if err := rows.Scan(dest...); err != nil {
			return nil, mapErr("query usage", err)
		}
		if r.Requests == 0 {
			continue
		}
		row := r
		row.Group = make(map[string]string, len(cols))
		for i, dim := range q.GroupBy {
			row.Group[dim] = groups[i].String
		}
		out = append(out, row)
	}
	if err := rows.Err(); err != nil {
		return nil, mapErr("query usage", err)
	}
	return out, nil
}

// PruneUsage deletes usage records older than before and returns how many
// it deleted.
func (s *Store) PruneUsage(ctx context.Context, before time.Time) (int64, error) {
	var n int64
	err := s.write(ctx, "prune usage", false, func(tx *gorm.DB) error {
		res := tx.Exec("DELETE FROM usage_records WHERE ts < ?", before.UnixMicro())
		n = res.RowsAffected
		return res.Error
	})
	return n, err
}
