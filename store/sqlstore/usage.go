package sqlstore

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/keypool/keypool/store"
)

// usageBatch is how many usage rows go into one INSERT.
const usageBatch = 1000

// AppendUsage inserts usage records in batches, in one transaction. A
// record with a zero Time is stamped now. Usage rows have no foreign keys:
// they outlive the teams, tokens and keys they name.
func (s *Store) AppendUsage(ctx context.Context, recs []store.UsageRecord) error {
	if len(recs) == 0 {
		return nil
	}
	now := s.now()
	rows := make([]usageRow, len(recs))
	for i := range recs {
		r := &recs[i]
		t := r.Time
		if t.IsZero() {
			t = now
		}
		rows[i] = usageRow{
			Ts: t.UnixMicro(), RequestID: r.RequestID, TeamID: r.TeamID, TokenID: r.TokenID,
			Service: r.Service, KeyID: r.KeyID, Model: r.Model, Status: r.Status,
			TokensIn: r.TokensIn, TokensOut: r.TokensOut, CachedTokens: r.CachedTokens,
			Cost: r.Cost, LatencyMS: r.LatencyMS,
		}
	}
	return s.write(ctx, "append usage", false, func(tx *gorm.DB) error {
		return tx.CreateInBatches(&rows, usageBatch).Error
	})
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
