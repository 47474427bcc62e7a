package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/url"
	"strconv"
)

// runTier runs "keypoold tier VERB": tiers of features with requests per
// minute, through the admin API.
func runTier(ctx context.Context, c *client, fs *flag.FlagSet, verb string, args []string, stdout io.Writer,
	asJSON *bool, show func(rows []map[string]any, cols ...string) error) error {
	switch verb {
	case "add":
		name := fs.String("name", "", "tier name (required)")
		desc := fs.String("description", "", "what the tier is for")
		feats := kv{}
		fs.Var(feats, "feature", "feature=rpm, e.g. image-generation=100 (repeatable; required)")
		if _, err := parseArgs(fs, args, 0, "", stdout); err != nil {
			return err
		}
		features := make(map[string]int, len(feats))
		for f, v := range feats {
			n, err := strconv.Atoi(v)
			if err != nil {
				return &usageError{msg: fmt.Sprintf("keypoold tier add: --feature %s=%s: the rpm must be a whole number", f, v)}
			}
			features[f] = n
		}
		body := map[string]any{"name": *name, "features": features}
		setIf(body, "description", *desc)
		return printObject(ctx, c, stdout, *asJSON, "POST", "/admin/tiers", body)
	case "list":
		if _, err := parseArgs(fs, args, 0, "", stdout); err != nil {
			return err
		}
		var out struct{ Tiers []map[string]any }
		if err := c.json(ctx, "GET", "/admin/tiers", nil, &out); err != nil {
			return err
		}
		return show(out.Tiers, "name", "features", "description")
	case "get", "delete":
		args, err := parseArgs(fs, args, 1, "one argument, the tier NAME", stdout)
		if err != nil {
			return err
		}
		path := "/admin/tiers/" + url.PathEscape(args[0])
		if verb == "get" {
			return printObject(ctx, c, stdout, *asJSON, "GET", path, nil)
		}
		if err := c.json(ctx, "DELETE", path, nil, nil); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "deleted tier", args[0])
		return nil
	case "set":
		rest, err := parseArgs(fs, args, -1, "", stdout)
		if err != nil {
			return err
		}
		if len(rest) < 2 {
			return &usageError{msg: "keypoold tier set: want the tier NAME and at least one field=value",
				help: func(w io.Writer) { fs.SetOutput(w); fs.Usage() }}
		}
		body, err := fieldValues(rest[1:])
		if err != nil {
			return &usageError{msg: fmt.Sprintf("keypoold tier set: %v", err)}
		}
		return printObject(ctx, c, stdout, *asJSON, "PATCH", "/admin/tiers/"+url.PathEscape(rest[0]), body)
	}
	return &usageError{msg: fmt.Sprintf("keypoold: unknown command %q", "tier "+verb), help: shortUsage}
}
