package console

import (
	"math"
	"slices"
	"testing"
	"time"
)

func day(d string) *string { return &d }

// TestChartTicks checks that the axis steps by a round number (1, 2 or 5
// times a power of ten) from 0 to a top at or above the highest bar.
func TestChartTicks(t *testing.T) {
	today := time.Now().UTC().Format(time.DateOnly)
	for _, tc := range []struct {
		name   string
		metric string
		row    usageRow
		want   []string
	}{
		{"seven requests", "requests", usageRow{Requests: 7}, []string{"0", "2", "4", "6", "8"}},
		{"one request", "requests", usageRow{Requests: 1}, []string{"0", "1"}},
		{"no requests", "requests", usageRow{}, []string{"0", "1"}},
		{"1234 requests", "requests", usageRow{Requests: 1234}, []string{"0", "500", "1,000", "1,500"}},
		{"tokens", "tokens", usageRow{TokensIn: 300, TokensOut: 90}, []string{"0", "100", "200", "300", "400"}},
		{"cost", "cost", usageRow{Cost: 0.034}, []string{"$0.00", "$0.01", "$0.02", "$0.03", "$0.04"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.row.Day = day(today)
			c := chart([]usageRow{tc.row}, today, today, tc.metric)
			var got []string
			for _, tk := range c.Ticks {
				got = append(got, tk.Label)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("ticks = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestChartMetrics checks that the chart draws requests, tokens in and
// out (stacked) or cost per day, as the page's "Chart" menu asks.
func TestChartMetrics(t *testing.T) {
	today := time.Now().UTC().Format(time.DateOnly)
	rows := []usageRow{{Day: day(today), Requests: 2, TokensIn: 300, TokensOut: 100, Cost: 0.5}}
	c := chart(rows, today, today, "tokens")
	if c.Title != "Tokens per day, in and out" || len(c.Bars) != 1 || len(c.Bars[0].Segs) != 2 {
		t.Fatalf("tokens chart: %q, %+v", c.Title, c.Bars)
	}
	in, out := c.Bars[0].Segs[0], c.Bars[0].Segs[1]
	if math.Abs(in.H-3*out.H) > 1e-9 || in.Y != out.Y+out.H {
		t.Errorf("tokens in %+v and out %+v are not stacked 3:1", in, out)
	}
	if c := chart(rows, today, today, "cost"); c.Title != "Cost per day (USD)" || len(c.Bars[0].Segs) != 1 {
		t.Errorf("cost chart: %q, %+v", c.Title, c.Bars)
	}
	if c := chart(rows, today, today, "anything"); c.Title != "Requests per day" || c.Metric != "requests" {
		t.Errorf("default chart: %q %q", c.Title, c.Metric)
	}
}
