package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/keypool/keypool"
)

// command is a CLI command ("key") and its subcommands ("add", "list", …).
type command struct {
	name    string
	summary string
	args    string // synopsis of a command without subcommands
	subs    []subcommand
}

// subcommand is one verb of a command.
type subcommand struct {
	name    string
	args    string // synopsis after "keypoold NOUN VERB"
	summary string
}

// commands are the CLI commands, in the order of the help.
var commands = []command{
	{name: "service", summary: "upstream APIs: base URL, auth scheme, selector, limits", subs: []subcommand{
		{"add", "--name N --base-url URL [flags]", "add a service"},
		{"list", "", "list services"},
		{"get", "NAME", "show one service"},
		{"set", "NAME field=value…", "change a service's fields (JSON values: is_active=false, llm_family=openai)"},
		{"delete", "NAME", "delete a service"},
	}},
	{name: "key", summary: "the upstream keys of a service", subs: []subcommand{
		{"add", "--service S [--value V | the value on stdin] [flags]", "add one key"},
		{"import", "--service S [--tier T] [--partial] < keys.txt", "add many keys, one per line or a JSON array (all or nothing; --partial imports the good lines)"},
		{"list", "[--service S]", "list keys and their live state"},
		{"delete", "ID", "delete a key"},
		{"enable", "ID", "put a key back in rotation (also an invalid or exhausted one)"},
		{"disable", "ID", "take a key out of rotation"},
	}},
	{name: "tier", summary: "tiers: features with requests per minute that keys join", subs: []subcommand{
		{"add", "--name N --feature F=RPM… [--description D]", "add a tier"},
		{"list", "", "list tiers"},
		{"get", "NAME", "show one tier"},
		{"set", "NAME field=value…", `change a tier (features={"image-generation":200})`},
		{"delete", "NAME", "delete a tier no key belongs to"},
	}},
	{name: "team", summary: "teams: limits and allowed services", subs: []subcommand{
		{"add", "--name N [flags]", "add a team"},
		{"list", "", "list teams"},
		{"set", "ID|NAME field=value…", "change a team's fields (rpm_limit=100, description=…)"},
	}},
	{name: "user", summary: "users of a team", subs: []subcommand{
		{"add", "--external-id E --team T", "add a user to a team"},
		{"list", "[--team T]", "list users"},
	}},
	{name: "token", summary: "team tokens (kp_…), the API keys clients use", subs: []subcommand{
		{"create", "--name N (--team T | --user U) [flags]", "create a token; its value is shown once"},
		{"list", "[--team T]", "list tokens (never their values)"},
		{"revoke", "ID", "revoke a token"},
		{"set", "ID field=value…", "change a token's fields (description=…, rpm_limit=10)"},
	}},
	{name: "admin-user", summary: "people who sign in to the console and the admin API", subs: []subcommand{
		{"add", "--username U [--role admin|viewer] < password", "add an admin user; the password is read from stdin"},
		{"list", "", "list admin users"},
		{"passwd", "USERNAME < password", "set a new password (ends the user's sessions)"},
		{"disable", "USERNAME", "disable a user (ends the user's sessions)"},
	}},
	{name: "usage", summary: "requests, LLM tokens and cost, grouped", args: "[--group-by service,day] [--since 2025-01-01] [--csv] [flags]"},
	{name: "health", summary: "the server's health", args: ""},
}

// findCommand returns the command named name (a plural too: "keys"), or nil.
func findCommand(name string) *command {
	for i := range commands {
		if c := &commands[i]; name == c.name || name == c.name+"s" {
			return c
		}
	}
	return nil
}

// verbs returns "add|list|…", or "" for a command without subcommands.
func (c *command) verbs() string {
	names := make([]string, len(c.subs))
	for i, s := range c.subs {
		names[i] = s.name
	}
	return strings.Join(names, "|")
}

func (c *command) sub(name string) *subcommand {
	for i := range c.subs {
		if c.subs[i].name == name {
			return &c.subs[i]
		}
	}
	return nil
}

// usage prints the command's subcommands.
func (c *command) usage(w io.Writer) {
	if len(c.subs) == 0 {
		fmt.Fprintf(w, "Usage: %s\n\n%s. Run \"keypoold %s -h\" for its flags.\n", strings.TrimSpace("keypoold "+c.name+" "+c.args), capitalize(c.summary), c.name)
		return
	}
	fmt.Fprintf(w, "Usage: keypoold %s SUBCOMMAND [flags]\n\n%s.\n\nSubcommands:\n", c.name, capitalize(c.summary))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, s := range c.subs {
		fmt.Fprintf(tw, "  %s %s\t%s\n", s.name, s.args, s.summary)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "\nRun \"keypoold %s SUBCOMMAND -h\" for a subcommand's flags.\n", c.name)
}

func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// flagUsage returns the usage printer of a command's flag set.
func flagUsage(fs *flag.FlagSet, synopsis, summary string) func() {
	return func() {
		w := fs.Output()
		fmt.Fprintf(w, "Usage: %s\n", strings.TrimSpace(fs.Name()+" "+synopsis))
		if summary != "" {
			fmt.Fprintf(w, "\n%s.\n", capitalize(summary))
		}
		n := 0
		fs.VisitAll(func(*flag.Flag) { n++ })
		if n > 0 {
			fmt.Fprintln(w, "\nFlags:")
			fs.PrintDefaults()
		}
	}
}

// parseArgs parses a command's flags and wants exactly nargs positional
// arguments among them (any number when nargs < 0). For -h it prints the usage on stdout and returns
// flag.ErrHelp; a bad flag or argument is a *usageError.
func parseArgs(fs *flag.FlagSet, args []string, nargs int, argNames string, stdout io.Writer) ([]string, error) {
	var buf bytes.Buffer
	fs.SetOutput(&buf)
	pos, err := parseInterspersed(fs, args)
	help := func(w io.Writer) { fs.SetOutput(w); fs.Usage() }
	switch {
	case err == flag.ErrHelp:
		help(stdout)
		return nil, err
	case err != nil:
		return nil, &usageError{msg: fs.Name() + ": " + err.Error(), help: help}
	case nargs == 0 && len(pos) > 0:
		return nil, &usageError{msg: fmt.Sprintf("%s: unexpected argument %q", fs.Name(), pos[0]), help: help}
	case nargs >= 0 && len(pos) != nargs:
		return nil, &usageError{msg: fmt.Sprintf("%s: want %s", fs.Name(), argNames), help: help}
	}
	return pos, nil
}

// parseInterspersed parses flags before, between and after positional
// arguments (`keypoold key disable ID --json`), and returns the positional
// ones in order. Everything after "--" is positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
}

// authSchemeHelp and selectorHelp list the names the library accepts.
var (
	authSchemeHelp = strings.Join(append(append([]string{}, keypool.AuthSchemeNames...), "header:<Name>", "query:<name>"), ", ")
	selectorHelp   = strings.Join(keypool.SelectorNames, ", ")
)
