package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/keypool/keypool/server"
)

// Environment variables of the CLI.
const (
	envURL = "KEYPOOL_URL"
)

// client calls a running keypoold's admin API. It finds the server and
// the admin token on its first call, so that -h works without them.
type client struct {
	env   env
	base  string
	token string
	http  *http.Client
}

// connect sets the server URL and the admin token from the environment.
func (c *client) connect() error {
	if c.token != "" {
		return nil
	}
	n, err := newClient(c.env)
	if err != nil {
		return err
	}
	c.base, c.token, c.http = n.base, n.token, n.http
	return nil
}

func newClient(e env) (*client, error) {
	base := serverURL(e)
	tok := e.get(server.EnvAdminToken)
	if tok == "" {
		dir := e.get(server.EnvDataDir)
		if dir == "" {
			dir = "data"
		}
		if b, err := os.ReadFile(filepath.Join(dir, server.AdminTokenFile)); err == nil {
			tok = strings.TrimSpace(string(b))
		}
	}
	if tok == "" {
		return nil, errors.New("set KEYPOOL_ADMIN_TOKEN to the server's admin token")
	}
	return &client{env: e, base: strings.TrimRight(base, "/"), token: tok, http: &http.Client{Timeout: 60 * time.Second}}, nil
}

// call sends a request and decodes a JSON answer into out (if not nil).
// A non-2xx answer is an error carrying the server's message.
func (c *client) call(ctx context.Context, method, path, contentType string, body io.Reader, out any) error {
	if err := c.connect(); err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e struct {
			Error struct{ Message, Code string } `json:"error"`
			// Lines are the rejected lines of a key import.
			Lines []struct {
				Line          int
				Code, Message string
			} `json:"lines"`
		}
		if json.Unmarshal(raw, &e) == nil && e.Error.Message != "" {
			msg := fmt.Sprintf("%s %s: %d %s: %s", method, path, resp.StatusCode, e.Error.Code, e.Error.Message)
			for _, l := range e.Lines {
				msg += fmt.Sprintf("\n  line %d: %s: %s", l.Line, l.Code, l.Message)
			}
			return errors.New(msg)
		}
		return fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	if out != nil && len(raw) > 0 {
		return json.Unmarshal(raw, out)
	}
	return nil
}

func (c *client) json(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	ct := ""
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body, ct = bytes.NewReader(b), "application/json"
	}
	return c.call(ctx, method, path, ct, body, out)
}

// kv collects repeated k=v flags.
type kv map[string]string

func (m kv) String() string { return fmt.Sprint(map[string]string(m)) }

func (m kv) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want key=value, got %q", s)
	}
	m[k] = v
	return nil
}

func list(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// runCLI runs an admin command: "service add", "key list", ….
func runCLI(ctx context.Context, noun string, args []string, e env, stdin io.Reader, stdout io.Writer) error {
	def := findCommand(noun)
	if def == nil {
		return &usageError{msg: fmt.Sprintf("keypoold: unknown command %q", noun), help: shortUsage}
	}
	noun = def.name
	cmd, synopsis, summary := noun, def.args, def.summary
	verb := ""
	if len(def.subs) > 0 {
		if len(args) == 0 || strings.HasPrefix(args[0], "-") {
			if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
				def.usage(stdout)
				return flag.ErrHelp
			}
			return &usageError{msg: fmt.Sprintf("keypoold %s: missing subcommand (%s)", noun, def.verbs()), help: def.usage}
		}
		verb, args = args[0], args[1:]
		if verb == "help" {
			def.usage(stdout)
			return flag.ErrHelp
		}
		sub := def.sub(verb)
		if sub == nil {
			return &usageError{msg: fmt.Sprintf("keypoold %s: unknown subcommand %q (%s)", noun, verb, def.verbs()), help: def.usage}
		}
		cmd, synopsis, summary = noun+" "+verb, sub.args, sub.summary
	}
	c := &client{env: e}
	fs := flag.NewFlagSet("keypoold "+cmd, flag.ContinueOnError)
	fs.Usage = flagUsage(fs, synopsis, summary)
	asJSON := fs.Bool("json", false, "print the answer as JSON instead of a table or a line of text")
	parse := func(args []string) error {
		_, err := parseArgs(fs, args, 0, "", stdout)
		return err
	}
	// show prints rows as a table, or as JSON with --json.
	show := func(rows []map[string]any, cols ...string) error {
		if *asJSON {
			return writeJSON(stdout, rows)
		}
		return table(stdout, rows, cols...)
	}
	if noun == "tier" {
		return runTier(ctx, c, fs, verb, args, stdout, asJSON, show)
	}
	switch cmd {
	case "service add":
		name := fs.String("name", "", "service name, the {service} in /v1/{service}/… (required)")
		display := fs.String("display-name", "", "display name")
		baseURL := fs.String("base-url", "", "upstream base URL, e.g. https://api.openai.com (required)")
		scheme := fs.String("auth-scheme", "bearer", "how the key is sent: "+authSchemeHelp)
		rpm := fs.Int("rate-limit-rpm", 0, "requests per minute the upstream allows each key")
		clientRPM := fs.Int("rpm-limit", 0, "requests per minute for all clients of the service together")
		selector := fs.String("selector", "", "how a key is picked: "+selectorHelp+" (default round_robin)")
		ext := fs.String("external-name", "", "service name in the external credential table")
		headers := kv{}
		fs.Var(headers, "header", "header added to every upstream request, Name=Value (repeatable)")
		if err := parse(args); err != nil {
			return err
		}
		body := map[string]any{"name": *name, "base_url": *baseURL, "auth_scheme": *scheme}
		setIf(body, "display_name", *display)
		setIf(body, "selector", *selector)
		setIf(body, "external_name", *ext)
		if *rpm != 0 {
			body["rate_limit_rpm"] = *rpm
		}
		if *clientRPM != 0 {
			body["rpm_limit"] = *clientRPM
		}
		if len(headers) > 0 {
			body["proxy_headers"] = map[string]string(headers)
		}
		return printObject(ctx, c, stdout, *asJSON, "POST", "/admin/services", body)
	case "service list":
		if err := parse(args); err != nil {
			return err
		}
		var out struct{ Services []map[string]any }
		if err := c.json(ctx, "GET", "/admin/services", nil, &out); err != nil {
			return err
		}
		return show(out.Services, "name", "base_url", "auth_scheme", "rate_limit_rpm", "selector", "external_name", "is_active")
	case "service get", "service delete":
		args, err := parseArgs(fs, args, 1, "one argument, the service NAME", stdout)
		if err != nil {
			return err
		}
		if verb == "get" {
			return printObject(ctx, c, stdout, *asJSON, "GET", "/admin/services/"+url.PathEscape(args[0]), nil)
		}
		if err := c.json(ctx, "DELETE", "/admin/services/"+url.PathEscape(args[0]), nil, nil); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "deleted service", args[0])
		return nil

	case "key add":
		service := fs.String("service", "", "service name (required)")
		value := fs.String("value", "", "the key; if empty, read from the first line of stdin (keeps it out of shell history)")
		weight := fs.Int("weight", 0, "weight for the weighted selector")
		priority := fs.Int("priority", 0, "priority for the ordered selector (lower first)")
		rpm := fs.Int("rate-limit-rpm", 0, "requests per minute the upstream allows this key")
		total := fs.Float64("balance-total", 0, "quota or balance of the key")
		unit := fs.String("balance-unit", "", "unit of the balance: usd, requests, credits, …")
		email := fs.String("email", "", "account email")
		tier := fs.String("tier", "", "the tier the key joins (its features' rpm apply)")
		labels := kv{}
		fs.Var(labels, "label", "label k=v, e.g. feature=image-gen (repeatable)")
		if err := parse(args); err != nil {
			return err
		}
		v := *value
		if v == "" {
			line, err := bufio.NewReader(stdin).ReadString('\n')
			if err != nil && line == "" {
				return errors.New("no key value: pass --value or write it on stdin")
			}
			v = strings.TrimSpace(line)
		}
		body := map[string]any{"service": *service, "key_value": v}
		setIf(body, "balance_unit", *unit)
		setIf(body, "account_email", *email)
		setIf(body, "tier", *tier)
		for k, n := range map[string]int{"weight": *weight, "priority": *priority, "rate_limit_rpm": *rpm} {
			if n != 0 {
				body[k] = n
			}
		}
		if *total != 0 {
			body["balance_total"] = *total
		}
		if len(labels) > 0 {
			body["labels"] = map[string]string(labels)
		}
		var out map[string]any
		if err := c.json(ctx, "POST", "/admin/keys", body, &out); err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(stdout, out)
		}
		fmt.Fprintf(stdout, "added key %v (%v) to %v\n", out["id"], out["hint"], out["service"])
		return nil
	case "key import":
		service := fs.String("service", "", "service the keys belong to (required; a JSON element may name its own)")
		tier := fs.String("tier", "", "tier every key of a one-per-line import joins")
		partial := fs.Bool("partial", false, "import the good lines and list the rejected ones (default: all or nothing)")
		if err := parse(args); err != nil {
			return err
		}
		in, err := io.ReadAll(stdin)
		if err != nil {
			return err
		}
		// A JSON array of key objects (each with its own tier, weight, …)
		// or one key value per line.
		ct := "text/plain"
		if t := bytes.TrimSpace(in); len(t) > 0 && t[0] == '[' {
			ct = "application/json"
		}
		if *service == "" && ct == "text/plain" {
			return &usageError{msg: "keypoold key import: --service is required", help: func(w io.Writer) { fs.SetOutput(w); fs.Usage() }}
		}
		q := url.Values{}
		for k, v := range map[string]string{"service": *service, "tier": *tier} {
			if v != "" {
				q.Set(k, v)
			}
		}
		if *partial {
			q.Set("partial", "true")
		}
		var out struct {
			Created  int              `json:"created"`
			Keys     []map[string]any `json:"keys"`
			Rejected []struct {
				Line    int    `json:"line"`
				Code    string `json:"code"`
				Message string `json:"message"`
			} `json:"rejected,omitempty"`
		}
		if err := c.call(ctx, "POST", "/admin/keys/import?"+q.Encode(), ct, bytes.NewReader(in), &out); err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(stdout, out)
		}
		to := ""
		if *service != "" {
			to = " to " + *service
		}
		fmt.Fprintf(stdout, "imported %d %s%s", out.Created, plural(out.Created, "key", "keys"), to)
		if n := len(out.Rejected); n > 0 {
			fmt.Fprintf(stdout, "; %d %s rejected:", n, plural(n, "line", "lines"))
			for _, l := range out.Rejected {
				fmt.Fprintf(stdout, "\n  line %d: %s: %s", l.Line, l.Code, l.Message)
			}
		}
		fmt.Fprintln(stdout)
		return show(out.Keys, "id", "hint", "state")
	case "key list":
		service := fs.String("service", "", "only keys of this service")
		if err := parse(args); err != nil {
			return err
		}
		path := "/admin/keys"
		if *service != "" {
			path += "?service=" + url.QueryEscape(*service)
		}
		var out struct{ Keys []map[string]any }
		if err := c.json(ctx, "GET", path, nil, &out); err != nil {
			return err
		}
		return show(out.Keys, "id", "service", "hint", "state", "status", "in_flight", "requests_last_minute", "cooldown_until")
	case "key delete":
		args, err := parseArgs(fs, args, 1, "one argument, the key ID", stdout)
		if err != nil {
			return err
		}
		if err := c.json(ctx, "DELETE", "/admin/keys/"+url.PathEscape(args[0]), nil, nil); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "deleted key", args[0])
		return nil
	case "key enable", "key disable":
		args, err := parseArgs(fs, args, 1, "one argument, the key ID", stdout)
		if err != nil {
			return err
		}
		status := map[string]string{"enable": "active", "disable": "disabled"}[verb]
		var out map[string]any
		if err := c.json(ctx, "PATCH", "/admin/keys/"+url.PathEscape(args[0]), map[string]any{"status": status}, &out); err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(stdout, out)
		}
		fmt.Fprintf(stdout, "key %s is %v\n", args[0], out["status"])
		return nil
	case "service set", "team set", "token set":
		rest, err := parseArgs(fs, args, -1, "", stdout)
		if err != nil {
			return err
		}
		if len(rest) < 2 {
			return &usageError{msg: fmt.Sprintf("keypoold %s: want the %s and at least one field=value", cmd, map[string]string{"service": "service NAME", "team": "team ID or NAME", "token": "token ID"}[noun]),
				help: func(w io.Writer) { fs.SetOutput(w); fs.Usage() }}
		}
		body, err := fieldValues(rest[1:])
		if err != nil {
			return &usageError{msg: fmt.Sprintf("keypoold %s: %v", cmd, err)}
		}
		id := rest[0]
		if noun == "team" {
			if id, err = c.teamID(ctx, id); err != nil {
				return err
			}
		}
		path := map[string]string{"service": "/admin/services/", "team": "/admin/teams/", "token": "/admin/tokens/"}[noun] + url.PathEscape(id)
		return printObject(ctx, c, stdout, *asJSON, "PATCH", path, body)

	case "team add":
		name := fs.String("name", "", "team name (required)")
		rpm := fs.Int("rpm-limit", 0, "requests per minute for the whole team")
		tpm := fs.Int64("tpm-limit", 0, "LLM tokens per minute for the whole team")
		daily := fs.Int64("daily-token-limit", 0, "LLM tokens per day for the whole team")
		allowed := fs.String("allowed-services", "", "comma-separated services the team may use (empty: all)")
		if err := parse(args); err != nil {
			return err
		}
		body := map[string]any{"name": *name}
		if *rpm != 0 {
			body["rpm_limit"] = *rpm
		}
		if *tpm != 0 {
			body["tpm_limit"] = *tpm
		}
		if *daily != 0 {
			body["daily_token_limit"] = *daily
		}
		if l := list(*allowed); len(l) > 0 {
			body["allowed_services"] = l
		}
		return printObject(ctx, c, stdout, *asJSON, "POST", "/admin/teams", body)
	case "team list":
		if err := parse(args); err != nil {
			return err
		}
		var out struct{ Teams []map[string]any }
		if err := c.json(ctx, "GET", "/admin/teams", nil, &out); err != nil {
			return err
		}
		return show(out.Teams, "id", "name", "rpm_limit", "allowed_services")

	case "user add":
		ext := fs.String("external-id", "", "the user's id elsewhere, e.g. an email (required)")
		team := fs.String("team", "", "team id or name (required)")
		if err := parse(args); err != nil {
			return err
		}
		teamID, err := c.teamID(ctx, *team)
		if err != nil {
			return err
		}
		return printObject(ctx, c, stdout, *asJSON, "POST", "/admin/users", map[string]any{"external_id": *ext, "team_id": teamID})
	case "user list":
		team := fs.String("team", "", "only users of this team (id or name)")
		if err := parse(args); err != nil {
			return err
		}
		path := "/admin/users"
		if *team != "" {
			id, err := c.teamID(ctx, *team)
			if err != nil {
				return err
			}
			path += "?team_id=" + url.QueryEscape(id)
		}
		var out struct{ Users []map[string]any }
		if err := c.json(ctx, "GET", path, nil, &out); err != nil {
			return err
		}
		return show(out.Users, "id", "external_id", "team_id")

	case "token create":
		name := fs.String("name", "", "token name, e.g. dev-laptop (required)")
		team := fs.String("team", "", "team id or name (or --user)")
		user := fs.String("user", "", "user id: the token counts against the user's team")
		scopes := fs.String("scopes", "", "comma-separated scopes; \"lease\" allows GET /key")
		rpm := fs.Int("rpm-limit", 0, "requests per minute for this token")
		expires := fs.Duration("expires-in", 0, "lifetime, e.g. 720h (default: never expires)")
		if err := parse(args); err != nil {
			return err
		}
		body := map[string]any{"name": *name}
		switch {
		case *user != "":
			body["user_id"] = *user
		case *team != "":
			id, err := c.teamID(ctx, *team)
			if err != nil {
				return err
			}
			body["team_id"] = id
		default:
			return &usageError{msg: "keypoold token create: --team or --user is required", help: func(w io.Writer) { fs.SetOutput(w); fs.Usage() }}
		}
		if l := list(*scopes); len(l) > 0 {
			body["scopes"] = l
		}
		if *rpm != 0 {
			body["rpm_limit"] = *rpm
		}
		if *expires > 0 {
			body["expires_at"] = time.Now().Add(*expires).UTC().Format(time.RFC3339)
		}
		var out map[string]any
		if err := c.json(ctx, "POST", "/admin/tokens", body, &out); err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(stdout, out)
		}
		fmt.Fprintf(stdout, "created token %v (%v); it is shown only once:\n%v\n", out["id"], out["prefix"], out["token"])
		return nil
	case "token list":
		team := fs.String("team", "", "only tokens of this team (id or name)")
		if err := parse(args); err != nil {
			return err
		}
		path := "/admin/tokens"
		if *team != "" {
			id, err := c.teamID(ctx, *team)
			if err != nil {
				return err
			}
			path += "?team_id=" + url.QueryEscape(id)
		}
		var out struct{ Tokens []map[string]any }
		if err := c.json(ctx, "GET", path, nil, &out); err != nil {
			return err
		}
		return show(out.Tokens, "id", "name", "prefix", "team_id", "scopes", "is_active", "expires_at")
	case "token revoke":
		args, err := parseArgs(fs, args, 1, "one argument, the token ID", stdout)
		if err != nil {
			return err
		}
		if err := c.json(ctx, "PATCH", "/admin/tokens/"+url.PathEscape(args[0]), map[string]any{"is_active": false}, nil); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "revoked token", args[0])
		return nil

	case "admin-user add":
		username := fs.String("username", "", "username (required)")
		role := fs.String("role", "viewer", "admin (everything) or viewer (reads only)")
		if err := parse(args); err != nil {
			return err
		}
		pw, err := readPassword(stdin)
		if err != nil {
			return err
		}
		var out map[string]any
		if err := c.json(ctx, "POST", "/admin/admin-users", map[string]any{"username": *username, "password": pw, "role": *role}, &out); err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(stdout, out)
		}
		fmt.Fprintf(stdout, "added admin user %v (%v, role %v)\n", out["username"], out["id"], out["role"])
		return nil
	case "admin-user list":
		if err := parse(args); err != nil {
			return err
		}
		var out struct {
			AdminUsers []map[string]any `json:"admin_users"`
		}
		if err := c.json(ctx, "GET", "/admin/admin-users", nil, &out); err != nil {
			return err
		}
		return show(out.AdminUsers, "id", "username", "role", "disabled", "last_login_at")
	case "admin-user passwd", "admin-user disable":
		args, err := parseArgs(fs, args, 1, "one argument, the USERNAME", stdout)
		if err != nil {
			return err
		}
		body := map[string]any{"disabled": true}
		if verb == "passwd" {
			pw, err := readPassword(stdin)
			if err != nil {
				return err
			}
			body = map[string]any{"password": pw}
		}
		if err := c.json(ctx, "PATCH", "/admin/admin-users/"+url.PathEscape(args[0]), body, nil); err != nil {
			return err
		}
		if verb == "passwd" {
			fmt.Fprintln(stdout, "changed the password of", args[0], "and ended its sessions")
		} else {
			fmt.Fprintln(stdout, "disabled", args[0], "and ended its sessions")
		}
		return nil

	case "usage":
		groupBy := fs.String("group-by", "service", "comma-separated: team, token, service, key, model, day")
		since := fs.String("since", "", "start (RFC 3339 or 2006-01-02)")
		until := fs.String("until", "", "end, exclusive")
		service := fs.String("service", "", "only this service")
		asCSV := fs.Bool("csv", false, "print the rows as CSV (a header line, then one line per group)")
		if err := parse(args); err != nil {
			return err
		}
		q := url.Values{"group_by": {*groupBy}}
		for k, v := range map[string]string{"since": *since, "until": *until, "service": *service} {
			if v != "" {
				q.Set(k, v)
			}
		}
		var out struct {
			Rows []map[string]any `json:"rows"`
		}
		if err := c.json(ctx, "GET", "/admin/usage?"+q.Encode(), nil, &out); err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(stdout, out)
		}
		if *asCSV {
			return usageCSV(stdout, list(*groupBy), out.Rows)
		}
		return table(stdout, out.Rows, usageColumns(list(*groupBy))...)
	case "health":
		if err := parse(args); err != nil {
			return err
		}
		var out map[string]any
		if err := c.json(ctx, "GET", "/admin/health", nil, &out); err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(stdout, out)
		}
		var services []map[string]any
		if l, ok := out["services"].([]any); ok {
			for _, s := range l {
				if m, ok := s.(map[string]any); ok {
					services = append(services, m)
				}
			}
		}
		return table(stdout, services, "name", "keys", "available", "in_flight", "requests_last_minute", "states")
	}
	return &usageError{msg: fmt.Sprintf("keypoold: unknown command %q", cmd), help: shortUsage}
}

func setIf(m map[string]any, k, v string) {
	if v != "" {
		m[k] = v
	}
}

// teamID resolves a team given by id or by name.
func (c *client) teamID(ctx context.Context, team string) (string, error) {
	if team == "" {
		return "", &usageError{msg: "keypoold: --team is required"}
	}
	var out struct{ Teams []map[string]any }
	if err := c.json(ctx, "GET", "/admin/teams", nil, &out); err != nil {
		return "", err
	}
	for _, t := range out.Teams {
		if t["id"] == team {
			return team, nil
		}
	}
	for _, t := range out.Teams {
		if t["name"] == team {
			return fmt.Sprint(t["id"]), nil
		}
	}
	return "", fmt.Errorf("no team %q", team)
}

// readPassword reads a password from the first line of stdin (so that it
// stays out of the shell history and the process list).
func readPassword(stdin io.Reader) (string, error) {
	line, err := bufio.NewReader(stdin).ReadString('\n')
	if err != nil && line == "" {
		return "", errors.New("no password: write it on stdin, e.g. `keypoold admin-user add --username alice < pw.txt`")
	}
	return strings.TrimRight(line, "\r\n"), nil
}

// plural returns one or many by n.
func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// fieldValues reads field=value arguments into a PATCH body: a value that
// is JSON (false, 100, null, ["a","b"], {"k":"v"}) is taken as such,
// anything else as a string.
func fieldValues(args []string) (map[string]any, error) {
	body := map[string]any{}
	for _, a := range args {
		k, v, ok := strings.Cut(a, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("want field=value, got %q", a)
		}
		var j any
		if err := json.Unmarshal([]byte(v), &j); err == nil {
			body[k] = j
		} else {
			body[k] = v
		}
	}
	return body, nil
}
