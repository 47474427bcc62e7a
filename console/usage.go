package console

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strconv"
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
		"Chart": chart(days.Rows, q.Get("since"), q.Get("until"), r.URL.Query().Get("metric")), "Metrics": chartMetrics, "Rows": rows.Rows, "Total": total,
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

// bar is one day of the chart: one segment, or two stacked (tokens in
// and out).
type bar struct {
	X, W      float64
	Segs      []seg
	Day       string
	Label     string
	Requests  int64
	Cost      float64
	TokensIn  int64
	TokensOut int64
}

// seg is a stacked part of a bar.
type seg struct {
	Y, H  float64
	Class string
}

// chartData is a server-rendered SVG bar chart of one metric per day.
type chartData struct {
	Width, Height float64
	Metric, Title string
	Bars          []bar
	Ticks         []tick
	Empty         bool
}

type tick struct {
	Y     float64
	Label string
}

// chartMetrics are the usage page's chart choices, by their query value.
var chartMetrics = []struct{ Value, Label, Title string }{
	{"requests", "Requests", "Requests per day"},
	{"tokens", "Tokens", "Tokens per day, in and out"},
	{"cost", "Cost", "Cost per day (USD)"},
}

// axis returns a round step (1, 2 or 5 times a power of ten, at least
// minStep) and the top of an axis of about four steps up to hi.
func axis(hi, minStep float64) (step, top float64) {
	if hi <= 0 {
		hi = minStep
	}
	raw := hi / 4
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	switch f := raw / mag; {
	case f <= 1:
		step = mag
	case f <= 2:
		step = 2 * mag
	case f <= 5:
		step = 5 * mag
	default:
		step = 10 * mag
	}
	step = max(step, minStep)
	return step, math.Ceil(hi/step-1e-9) * step
}

// chart lays out one bar per day from since to until (or today), of the
// metric: requests (the default), tokens (in and out stacked) or cost.
func chart(rows []usageRow, since, until, metric string) chartData {
	const w, hgt, left, bottom, top = 760.0, 220.0, 56.0, 28.0, 10.0
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
	c := chartData{Width: w, Height: hgt, Empty: len(rows) == 0, Metric: chartMetrics[0].Value, Title: chartMetrics[0].Title}
	for _, m := range chartMetrics {
		if m.Value == metric {
			c.Metric, c.Title = m.Value, m.Title
		}
	}
	// parts are a day's stacked values, bottom first.
	parts := func(u usageRow) []float64 {
		switch c.Metric {
		case "tokens":
			return []float64{float64(u.TokensIn), float64(u.TokensOut)}
		case "cost":
			return []float64{u.Cost}
		}
		return []float64{float64(u.Requests)}
	}
	var hi float64
	for _, d := range days {
		var sum float64
		for _, v := range parts(byDay[d]) {
			sum += v
		}
		hi = max(hi, sum)
	}
	minStep := 1.0 // whole requests and tokens
	if c.Metric == "cost" {
		minStep = 0.0001
	}
	step, axisTop := axis(hi, minStep)
	decimals := max(0, int(-math.Floor(math.Log10(step)+1e-9)))
	plotH := hgt - bottom - top
	for i := 0; float64(i)*step <= axisTop+step/2; i++ {
		val := float64(i) * step
		label := num(int64(math.Round(val)))
		if c.Metric == "cost" {
			label = "$" + strconv.FormatFloat(val, 'f', max(decimals, 2), 64)
		}
		c.Ticks = append(c.Ticks, tick{Y: top + plotH - plotH*val/axisTop, Label: label})
	}
	n := float64(max(len(days), 1))
	slot := (w - left - 8) / n
	for i, d := range days {
		u := byDay[d]
		b := bar{X: left + float64(i)*slot + slot*0.15, W: slot * 0.7, Day: d,
			Requests: u.Requests, Cost: u.Cost, TokensIn: u.TokensIn, TokensOut: u.TokensOut}
		y := top + plotH
		for j, v := range parts(u) {
			h := plotH * v / axisTop
			y -= h
			class := "bar"
			if j > 0 {
				class = "bar alt"
			}
			b.Segs = append(b.Segs, seg{Y: y, H: h, Class: class})
		}
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
