package admin

import (
	"encoding/csv"
	"math"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

// usageRow is one group of GET /admin/usage. Only the fields of the
// requested group_by dimensions are present; each names its group by id
// and by name.
type usageRow struct {
	TeamID    *string `json:"team_id,omitempty"`
	TeamName  *string `json:"team_name,omitempty"`
	TokenID   *string `json:"token_id,omitempty"`
	TokenName *string `json:"token_name,omitempty"`
	Service   *string `json:"service,omitempty"`
	KeyID     *string `json:"key_id,omitempty"`
	KeyHint   *string `json:"key_hint,omitempty"`
	Model     *string `json:"model,omitempty"`
	Router    *string `json:"router,omitempty"`
	Day       *string `json:"day,omitempty"`
	Requests  int64   `json:"requests"`
	TokensIn  int64   `json:"tokens_in"`
	TokensOut int64   `json:"tokens_out"`
	Cost      float64 `json:"cost"`
}

var groupDims = []string{store.GroupTeam, store.GroupToken, store.GroupService, store.GroupKey, store.GroupModel, store.GroupRouter, store.GroupDay}

// parseTime reads RFC 3339 or YYYY-MM-DD (UTC midnight). endOfDay moves a
// bare date to the next midnight, so that until=2025-01-31 includes that
// day.
func parseTime(field, v string, endOfDay bool) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t.UTC(), nil
	}
	if t, err := time.Parse(time.DateOnly, v); err == nil {
		if endOfDay {
			t = t.AddDate(0, 0, 1)
		}
		return t, nil
	}
	return time.Time{}, badRequest("%s must be an RFC 3339 time (2025-01-31T12:00:00Z) or a date (2025-01-31)", field)
}

// usage handles GET /admin/usage. Filters: team (id or name), token (id
// or prefix), service, key (id), model; since (inclusive) and until
// (exclusive; a bare date includes that whole day, UTC); group_by, a comma
// list of team, token, service, key, model, router, day (none: one total row);
// format=csv or Accept: text/csv for CSV.
func (a *API) usage(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r, "team", "token", "service", "key", "model", "since", "until", "group_by", "format"); err != nil {
		return err
	}
	qv := r.URL.Query()
	q := store.UsageQuery{
		Team: qv.Get("team"), Token: qv.Get("token"), Service: qv.Get("service"),
		Key: qv.Get("key"), Model: qv.Get("model"),
	}
	var err error
	if q.Since, err = parseTime("since", qv.Get("since"), false); err != nil {
		return err
	}
	if q.Until, err = parseTime("until", qv.Get("until"), true); err != nil {
		return err
	}
	if !q.Since.IsZero() && !q.Until.IsZero() && !q.Until.After(q.Since) {
		return badRequest("until must be after since")
	}
	seen := map[string]bool{}
	if g := strings.TrimSpace(qv.Get("group_by")); g != "" {
		for _, d := range strings.Split(g, ",") {
			d = strings.ToLower(strings.TrimSpace(d))
			ok := false
			for _, x := range groupDims {
				ok = ok || x == d
			}
			if !ok {
				return badRequest("group_by: unknown dimension %q (want a comma list of %s)", d, strings.Join(groupDims, ", "))
			}
			if !seen[d] {
				seen[d] = true
				q.GroupBy = append(q.GroupBy, d)
			}
		}
	}
	asCSV := false
	switch f := qv.Get("format"); f {
	case "csv":
		asCSV = true
	case "", "json":
		if f == "" {
			for _, part := range strings.Split(r.Header.Get("Accept"), ",") {
				if mt, _, err := mime.ParseMediaType(strings.TrimSpace(part)); err == nil && mt == "text/csv" {
					asCSV = true
				}
			}
		}
	default:
		return badRequest("format must be json or csv, not %q", f)
	}

	ctx := r.Context()
	var (
		teams  = map[string]string{} // id → name
		tokens = map[string]string{} // id → name
		hints  = map[string]string{} // key id → hint
	)
	if q.Team != "" || seen[store.GroupTeam] {
		ts, err := a.st.ListTeams(ctx)
		if err != nil {
			return err
		}
		byName := ""
		for _, t := range ts {
			teams[t.ID] = t.Name
			if t.Name == q.Team {
				byName = t.ID
			}
		}
		if _, isID := teams[q.Team]; q.Team != "" && !isID && byName != "" {
			q.Team = byName
		}
	}
	if q.Token != "" || seen[store.GroupToken] {
		ts, err := a.st.ListTokens(ctx, "")
		if err != nil {
			return err
		}
		byPrefix := ""
		for _, t := range ts {
			tokens[t.ID] = t.Name
			if t.Prefix == q.Token {
				byPrefix = t.ID
			}
		}
		if _, isID := tokens[q.Token]; q.Token != "" && !isID && byPrefix != "" {
			q.Token = byPrefix
		}
	}
	if seen[store.GroupKey] {
		ks, err := a.st.Keys(ctx, q.Service)
		if err != nil {
			return err
		}
		for i := range ks {
			hints[ks[i].ID] = ks[i].Hint
			ks[i].Secret = ""
		}
	}
	rows, err := a.st.QueryUsage(ctx, q)
	if err != nil {
		return err
	}
	out := make([]usageRow, len(rows))
	for i, row := range rows {
		u := usageRow{Requests: row.Requests, TokensIn: row.TokensIn, TokensOut: row.TokensOut, Cost: roundCost(row.Cost)}
		for _, d := range q.GroupBy {
			v := row.Group[d]
			switch d {
			case store.GroupTeam:
				n := teams[v]
				u.TeamID, u.TeamName = &v, &n
			case store.GroupToken:
				n := tokens[v]
				u.TokenID, u.TokenName = &v, &n
			case store.GroupService:
				u.Service = &v
			case store.GroupKey:
				h := hints[v]
				u.KeyID, u.KeyHint = &v, &h
			case store.GroupModel:
				u.Model = &v
			case store.GroupRouter:
				u.Router = &v
			case store.GroupDay:
				u.Day = &v
			}
		}
		out[i] = u
	}
	if asCSV {
		writeUsageCSV(w, q.GroupBy, out)
		return nil
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"rows": out})
	return nil
}

// csvColumns are the columns of each group dimension.
var csvColumns = map[string][]string{
	store.GroupTeam:    {"team_id", "team_name"},
	store.GroupToken:   {"token_id", "token_name"},
	store.GroupService: {"service"},
	store.GroupKey:     {"key_id", "key_hint"},
	store.GroupModel:   {"model"},
	store.GroupRouter:  {"router"},
	store.GroupDay:     {"day"},
}

func writeUsageCSV(w http.ResponseWriter, groupBy []string, rows []usageRow) {
	w.Header().Set("Content-Type", "text/csv; charset=utf-8")
	w.Header().Set("Content-Disposition", `attachment; filename="keypool-usage.csv"`)
	w.WriteHeader(http.StatusOK)
	cw := csv.NewWriter(w)
	var head []string
	for _, d := range groupBy {
		head = append(head, csvColumns[d]...)
	}
	head = append(head, "requests", "tokens_in", "tokens_out", "cost")
	_ = cw.Write(head)
	str := func(p *string) string {
		if p == nil {
			return ""
		}
		return csvSafe(*p)
	}
	for _, u := range rows {
		var rec []string
		for _, d := range groupBy {
			switch d {
			case store.GroupTeam:
				rec = append(rec, str(u.TeamID), str(u.TeamName))
			case store.GroupToken:
				rec = append(rec, str(u.TokenID), str(u.TokenName))
			case store.GroupService:
				rec = append(rec, str(u.Service))
			case store.GroupKey:
				rec = append(rec, str(u.KeyID), str(u.KeyHint))
			case store.GroupModel:
				rec = append(rec, str(u.Model))
			case store.GroupRouter:
				rec = append(rec, str(u.Router))
			case store.GroupDay:
				rec = append(rec, str(u.Day))
			}
		}
		rec = append(rec, strconv.FormatInt(u.Requests, 10), strconv.FormatInt(u.TokensIn, 10),
			strconv.FormatInt(u.TokensOut, 10), strconv.FormatFloat(u.Cost, 'f', -1, 64))
		_ = cw.Write(rec)
	}
	cw.Flush()
}

// roundCost rounds a summed cost to 1e-9, so that float sums print as
// 0.0000102, not 0.000010199999999999999.
func roundCost(c float64) float64 {
	if r := math.Round(c*1e9) / 1e9; !math.IsInf(r, 0) && !math.IsNaN(r) {
		return r
	}
	return c
}

// csvSafe keeps spreadsheets from reading a cell as a formula.
func csvSafe(s string) string {
	if s != "" && strings.ContainsRune("=+-@\t\r", rune(s[0])) {
		return "'" + s
	}
	return s
}
