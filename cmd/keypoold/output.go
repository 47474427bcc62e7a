package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
)

// The CLI's one output convention: lists print as tables, one object as
// a two-column table of its fields, an action as a line of text; --json
// prints the admin API's answer as JSON instead, for every command.

// printObject calls the admin API and shows the one object it answers:
// its fields as a table, or the answer as JSON with --json.
func printObject(ctx context.Context, c *client, w io.Writer, asJSON bool, method, path string, body any) error {
	var out map[string]any
	if err := c.json(ctx, method, path, body, &out); err != nil {
		return err
	}
	if asJSON {
		return writeJSON(w, out)
	}
	return fields(w, out)
}

// fields prints an object as a two-column table, FIELD and VALUE, in
// field order.
func fields(w io.Writer, obj map[string]any) error {
	names := make([]string, 0, len(obj))
	for k := range obj {
		names = append(names, k)
	}
	sort.Strings(names)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FIELD\tVALUE")
	for _, k := range names {
		fmt.Fprintf(tw, "%s\t%s\n", k, cell(obj[k]))
	}
	return tw.Flush()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// table prints rows with the given columns.
func table(w io.Writer, rows []map[string]any, cols ...string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.ToUpper(strings.Join(cols, "\t")))
	sort.SliceStable(rows, func(i, j int) bool { return fmt.Sprint(rows[i][cols[0]]) < fmt.Sprint(rows[j][cols[0]]) })
	for _, r := range rows {
		cells := make([]string, len(cols))
		for i, c := range cols {
			cells[i] = cell(r[c])
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

func cell(v any) string {
	switch x := v.(type) {
	case nil:
		return "-"
	case string:
		if x == "" {
			return "-"
		}
		return x
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64)
	case []any:
		parts := make([]string, len(x))
		for i, p := range x {
			parts[i] = cell(p)
		}
		return strings.Join(parts, ",")
	case map[string]any:
		// Compact JSON: {"image-generation":100}, not Go's map[…].
		var b strings.Builder
		enc := json.NewEncoder(&b)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(x); err != nil {
			return fmt.Sprint(x)
		}
		return strings.TrimSpace(b.String())
	}
	return fmt.Sprint(v)
}

// usageColumns are the columns of usage rows grouped by groupBy: the
// group-by columns, then requests, tokens_in, tokens_out and cost.
func usageColumns(groupBy []string) []string {
	var cols []string
	for _, g := range groupBy {
		switch g {
		case "team":
			cols = append(cols, "team_id", "team_name")
		case "token":
			cols = append(cols, "token_id", "token_name")
		case "key":
			cols = append(cols, "key_id", "key_hint")
		default:
			cols = append(cols, g)
		}
	}
	return append(cols, "requests", "tokens_in", "tokens_out", "cost")
}

// usageCSV prints usage rows as CSV: a header line of [usageColumns],
// then one line per group.
func usageCSV(w io.Writer, groupBy []string, rows []map[string]any) error {
	cols := usageColumns(groupBy)
	cw := csv.NewWriter(w)
	if err := cw.Write(cols); err != nil {
		return err
	}
	for _, r := range rows {
		rec := make([]string, len(cols))
		for i, c := range cols {
			if v, ok := r[c]; ok && v != nil {
				rec[i] = cell(v)
			}
		}
		if err := cw.Write(rec); err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}
