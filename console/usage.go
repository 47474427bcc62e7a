package console

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/keypool/keypool/auth"
)

// usageRow is a row of GET /admin/usage.
type usageRow struct {
	TeamID    *string `json:"team_id"`
	TeamName  *string `json:"team_name"`
	Service   *string `json:"service"`
	Model     *string `json:"model"`
	Day       *string `json:"day"`
	Requests  int64   `json:"requests"`
	TokensIn  int64   `json:"tokens_in"`
	TokensOut int64   `json:"tokens_out"`
	Cost      float64 `json:"cost"`
}

// usageQuery builds the admin API query of the usage page's filters.
func usageQuery(r *http.Request, groupBy string) url.Values {
	q := url.Values{}
	for _, k := range []string{"team", "service", "model", "since", "until"} {
		if v := strings.TrimSpace(r.URL.Query().Get(k)); v != "" {
			q.Set(k, v)
		}
	}
	if q.Get("since") == "" {
		q.Set("since", time.Now().UTC().AddDate(0, 0, -13).Format(time.DateOnly))
	}
	q.Set("group_by", groupBy)
	return q
}

func (h *Handler) usage(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	v := view{Title: "Usage", Nav: "usage", User: id, Flash: flash(r)}
	q := usageQuery(r, "day")
	var days struct {
		Rows []usageRow `json:"rows"`
	}
	if err := h.get(r, id, "/admin/usage?"+q.Encode(), &days); err != nil {
		v.Error = err.Error()
	}
	q.Set("group_by", "day,team,service,model")
	var rows struct {
		Rows []usageRow `json:"rows"`
	}
	if v.Error == "" {
		if err := h.get(r, id, "/admin/usage?"+q.Encode(), &rows); err != nil {
			v.Error = err.Error()
		}
	}
	var teams struct {
		Teams []map[string]any `json:"teams"`
	}
	_ = h.get(r, id, "/admin/teams", &teams)
	var svcs struct {
		Services []map[string]any `json:"services"`
	}
	_ = h.get(r, id, "/admin/services", &svcs)
	var total usageRow
	for _, d := range days.Rows {
		total.Requests += d.Requests
		total.TokensIn += d.TokensIn
		total.TokensOut += d.TokensOut
		total.Cost += d.Cost
	}
	filters := map[string]string{}
	for _, k := range []string{"team", "service", "model", "since", "until"} {
		filters[k] = q.Get(k)
	}
	csvQ := usageQuery(r, "day,team,service,model")
	v.Data = map[string]any{
		"Chart": chart(days.Rows, q.Get("since"), q.Get("until")), "Rows": rows.Rows, "Total": total,
		"Filters": filters, "Teams": teams.Teams, "Services": svcs.Services, "CSV": Prefix + "usage.csv?" + csvQ.Encode(),
		"Budgets": h.budgetUse(r, id),
	}
	h.render(w, http.StatusOK, "usage", v)
}

func (h *Handler) usageCSV(w http.ResponseWriter, r *http.Request, id auth.Identity) {
	q := usageQuery(r, "day,team,service,model")
	if g := r.URL.Query().Get("group_by"); g != "" {
		q.Set("group_by", g)
	}
	q.Set("format", "csv")
	res := h.call(r, id, http.MethodGet, "/admin/usage?"+q.Encode(), nil)
	if !res.ok() {
		http.Error(w, res.errMessage(), res.Status)
		return
	}
	w.Header().Set("Content-Type", "text/csv; charset=utf-8")
	w.Header().Set("Content-Disposition", `attachment; filename="keypool-usage.csv"`)
	_, _ = io.Copy(w, strings.NewReader(string(res.Body)))
}

// bar is one day of the chart.
type bar struct {
	X, Y, W, H float64
	Day        string
	Label      string
	Requests   int64
	Cost       float64
	Tokens     int64
}

// chartData is a server-rendered SVG bar chart of requests per day.
type chartData struct {
	Width, Height float64
	Bars          []bar
	Ticks         []tick
	Max           int64
	Empty         bool
}

type tick struct {
	Y     float64
	Label string
}

// chart lays out one bar per day from since to until (or today).
func chart(rows []usageRow, since, until string) chartData {
	const w, hgt, left, bottom, top = 760.0, 220.0, 48.0, 28.0, 10.0
	start, err := time.Parse(time.DateOnly, since)
	if err != nil {
		start = time.Now().UTC().AddDate(0, 0, -13)
	}
	end := time.Now().UTC()
	if u, err := time.Parse(time.DateOnly, until); err == nil {
		end = u
	}
	byDay := map[string]usageRow{}
	for _, r := range rows {
		if r.Day != nil {
			byDay[*r.Day] = r
		}
	}
	var days []string
	for d := start; !d.After(end) && len(days) < 92; d = d.AddDate(0, 0, 1) {
		days = append(days, d.Format(time.DateOnly))
	}
	c := chartData{Width: w, Height: hgt, Empty: len(rows) == 0}
	for _, d := range days {
		c.Max = max(c.Max, byDay[d].Requests)
	}
	scale := float64(max(c.Max, 1))
	// A round top for the axis.
	mag := math.Pow(10, math.Floor(math.Log10(scale)))
	top10 := math.Ceil(scale/mag) * mag
	plotH := hgt - bottom - top
	steps := 4
	if top10 < 4 {
		steps = int(top10) // whole numbers only
	}
	for i := 0; i <= steps; i++ {
		val := top10 * float64(i) / float64(steps)
		c.Ticks = append(c.Ticks, tick{Y: top + plotH - plotH*val/top10, Label: num(int64(math.Round(val)))})
	}
	n := float64(max(len(days), 1))
	slot := (w - left - 8) / n
	for i, d := range days {
		u := byDay[d]
		bh := plotH * float64(u.Requests) / top10
		b := bar{X: left + float64(i)*slot + slot*0.15, W: slot * 0.7, Y: top + plotH - bh, H: bh, Day: d,
			Requests: u.Requests, Cost: u.Cost, Tokens: u.TokensIn + u.TokensOut}
		if len(days) <= 16 || i%int(math.Ceil(n/16)) == 0 {
			b.Label = d[5:]
		}
		c.Bars = append(c.Bars, b)
	}
	return c
}

// budgetLine is one cost budget and its use.
type budgetLine struct {
	Scope, Name, Window string
	Used, Warn, Block   float64
	Level               string // "", "warn" or "block"
	UsedText, LimitText string
	Pct                 int
}

// budgetUse compares each team's and service's cost this hour, day, month
// and in total with its warn and block thresholds.
func (h *Handler) budgetUse(r *http.Request, id auth.Identity) []budgetLine {
	var teams struct {
		Teams []map[string]any `json:"teams"`
	}
	var svcs struct {
		Services []map[string]any `json:"services"`
	}
	if h.get(r, id, "/admin/teams", &teams) != nil || h.get(r, id, "/admin/services", &svcs) != nil {
		return nil
	}
	now := h.now().UTC()
	windows := []struct {
		name  string
		since time.Time
	}{
		{"hour", now.Truncate(time.Hour)},
		{"day", time.Date(now.Year(), now.Month(), now.Day(), 0, 0, 0, 0, time.UTC)},
		{"month", time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)},
		{"total", time.Time{}},
	}
	type scope struct {
		kind, group string
		recs        []map[string]any
	}
	var out []budgetLine
	for _, sc := range []scope{{"team", "team", teams.Teams}, {"service", "service", svcs.Services}} {
		for _, win := range windows {
			// Only ask for usage when some record has a threshold here.
			var has bool
			for _, rec := range sc.recs {
				has = has || num64(rec["limit_cost_"+win.name+"_warn"]) > 0 || num64(rec["limit_cost_"+win.name+"_block"]) > 0
			}
			if !has {
				continue
			}
			q := url.Values{"group_by": {sc.group}}
			if !win.since.IsZero() {
				q.Set("since", win.since.Format(time.RFC3339))
			}
			var res struct {
				Rows []usageRow `json:"rows"`
			}
			if h.get(r, id, "/admin/usage?"+q.Encode(), &res) != nil {
				continue
			}
			used := map[string]float64{}
			for _, row := range res.Rows {
				switch {
				case row.TeamID != nil:
					used[*row.TeamID] = row.Cost
				case row.Service != nil:
					used[*row.Service] = row.Cost
				}
			}
			for _, rec := range sc.recs {
				warn, block := num64(rec["limit_cost_"+win.name+"_warn"]), num64(rec["limit_cost_"+win.name+"_block"])
				if warn <= 0 && block <= 0 {
					continue
				}
				key, _ := rec["name"].(string)
				name := key
				if sc.kind == "team" {
					key, _ = rec["id"].(string)
				}
				u := used[key]
				b := budgetLine{Scope: sc.kind, Name: name, Window: win.name, Used: u, Warn: warn, Block: block,
					UsedText: fmt.Sprintf("$%.2f", u)}
				limit := block
				if limit <= 0 {
					limit = warn
				}
				b.LimitText = fmt.Sprintf("$%.2f", limit)
				if limit > 0 {
					b.Pct = int(math.Min(100, math.Round(100*u/limit)))
				}
				switch {
				case block > 0 && u >= block:
					b.Level = "block"
				case warn > 0 && u >= warn:
					b.Level = "warn"
				}
				out = append(out, b)
			}
		}
	}
	return out
}
