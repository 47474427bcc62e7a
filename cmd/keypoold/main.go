// Command keypoold is the keypool server: a proxy that pools upstream API
// keys, with an admin API, and a small CLI for that API.
//
//	keypoold [serve] [flags]          run the server (the default)
//	keypoold service add|list|get|delete …
//	keypoold key add|import|list|delete …
//	keypoold team add|list …
//	keypoold user add|list …
//	keypoold token create|list|revoke …
//	keypoold usage [--group-by …]
//	keypoold health
//	keypoold healthcheck [--ready]    exit 0 when the local server is healthy
//	keypoold version
//
// The server reads its configuration from the environment (KEYPOOL_*, see
// package server), an optional YAML file (KEYPOOL_CONFIG or -config), and
// flags, which override the environment, which overrides the file. With
// nothing set it serves on :8080 from SQLite under ./data. SIGINT and
// SIGTERM shut it down gracefully.
//
// The CLI commands talk to a running server's admin API at KEYPOOL_URL
// (default http://127.0.0.1:8080) with KEYPOOL_ADMIN_TOKEN (default: the
// token a zero-config server generated in ./data/admin_token).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/keypool/keypool/server"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], env{lookup: os.LookupEnv}, os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// env reads environment variables; tests pass a map.
type env struct{ lookup func(string) (string, bool) }

func (e env) get(name string) string {
	v, _ := e.lookup(name)
	return strings.TrimSpace(v)
}

// run executes one command line and returns the exit code: 0 on success
// and for an explicit -h, 2 for a usage error, 1 for any other error.
func run(ctx context.Context, args []string, e env, stdin io.Reader, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 {
		switch args[0] {
		case "help", "-h", "-help", "--help":
			if len(args) > 1 && args[0] == "help" {
				if c := findCommand(args[1]); c != nil {
					c.usage(stdout)
					return 0
				}
				if args[1] == "serve" {
					serveUsage(stdout)
					return 0
				}
				if c := findLocal(args[1]); c != nil {
					_ = runLocal(ctx, c, []string{"-h"}, e, stdout)
					return 0
				}
			}
			usage(stdout)
			return 0
		}
		if !strings.HasPrefix(args[0], "-") {
			cmd, args = args[0], args[1:]
		}
	}
	var err error
	switch cmd {
	case "serve":
		err = serve(ctx, args, e, stdout, stderr)
	case "healthcheck", "version":
		err = runLocal(ctx, findLocal(cmd), args, e, stdout)
	default:
		err = runCLI(ctx, cmd, args, e, stdin, stdout)
	}
	var ue *usageError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0 // the usage was printed on stdout
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, ue.msg)
		if ue.help != nil {
			fmt.Fprintln(stderr)
			ue.help(stderr)
		}
		return 2
	default:
		fmt.Fprintln(stderr, "keypoold:", err)
		return 1
	}
}

// errUsage matches every usage error (errors.Is).
var errUsage = errors.New("usage")

// usageError is a command line that cannot be run: msg is printed on
// stderr, then help (if set), and keypoold exits with 2.
type usageError struct {
	msg  string
	help func(io.Writer)
}

func (e *usageError) Error() string        { return e.msg }
func (e *usageError) Is(target error) bool { return target == errUsage }

func usage(w io.Writer) {
	fmt.Fprint(w, `keypoold pools upstream API keys behind a proxy with an admin API.

Usage:
  keypoold [serve] [flags]                  run the server (the default)
  keypoold COMMAND [SUBCOMMAND] [flags]     call a running server's admin API
  keypoold COMMAND -h                       a command's subcommands and flags

Commands:
`)
	commandList(w)
	fmt.Fprintln(w, "\nServer flags (keypoold serve; a flag overrides its KEYPOOL_* variable, which overrides the -config file):")
	newServeFlags(w).fs.PrintDefaults()
	fmt.Fprintf(w, `
Environment only (no flag):
  %[1]s      the admin API's bearer token. Server default: read from
                           DATA_DIR/%[2]s, or generated there and printed once.
                           CLI default: read from $%[4]s/%[3]s or ./data/%[3]s.
  %[5]s   64 hex characters (a comma-separated list to rotate; the first
                           seals) encrypting stored keys. Default: generated into
                           DATA_DIR/%[6]s, with a warning: set it in production.
  %[7]s           YAML or JSON price table merged over the shipped one.
  %[8]s              the server the CLI talks to (default http://127.0.0.1:8080,
                           or the port of %[9]s).

Examples:
  keypoold                                          serve on :8080 with SQLite under ./data
  keypoold service add --name openai --base-url https://api.openai.com
  keypoold key import --service openai < keys.txt
  keypoold team add --name eng && keypoold token create --name laptop --team eng
`, server.EnvAdminToken, server.AdminTokenFile, server.AdminTokenFile, server.EnvDataDir,
		server.EnvEncryptionKey, server.EncryptionKeyFile, server.EnvPrices, envURL, server.EnvListen)
}

// commandList prints one line per command.
func commandList(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "  serve\t\trun the proxy and the admin API (the default)\n")
	for _, c := range localCommands {
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", c.name, c.args, c.summary)
	}
	for _, c := range commands {
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", c.name, c.verbs(), c.summary)
	}
	fmt.Fprintf(tw, "  help\t[COMMAND]\tthis help, or a command's\n")
	_ = tw.Flush()
}

// shortUsage follows an unknown command.
func shortUsage(w io.Writer) {
	fmt.Fprintln(w, "Commands:")
	commandList(w)
	fmt.Fprintln(w, "\nRun \"keypoold -h\" for the server flags and the environment settings.")
}

// serveFlags are the flags of "keypoold serve".
type serveFlags struct {
	fs                                                            *flag.FlagSet
	configPath, listen, database, dataDir, redisURL, extDB, level *string
	format                                                        *string
	drainTimeout                                                  *time.Duration
}

// newServeFlags returns the serve flag set; its messages go to w.
func newServeFlags(w io.Writer) *serveFlags {
	fs := flag.NewFlagSet("keypoold serve", flag.ContinueOnError)
	fs.SetOutput(w)
	f := &serveFlags{fs: fs}
	f.configPath = fs.String("config", "", "YAML file of settings, services and keys (env "+server.EnvConfig+")")
	f.listen = fs.String("listen", "", "listen address (env "+server.EnvListen+", default "+server.DefaultListen+")")
	f.database = fs.String("database", "", "sqlite:PATH, a file path, or a postgres:// URL (env "+server.EnvDatabase+", default "+server.DefaultDatabase+")")
	f.dataDir = fs.String("data-dir", "", "directory of generated secrets (env "+server.EnvDataDir+", default: the SQLite file's directory or ./data)")
	f.redisURL = fs.String("redis-url", "", "Redis URL for limits shared by replicas (env "+server.EnvRedisURL+")")
	f.extDB = fs.String("external-database", "", "external credential table, sqlite:PATH or postgres:// URL (env "+server.EnvExternalDatabase+")")
	f.level = fs.String("log-level", "", "debug, info, warn or error (env "+server.EnvLogLevel+", default info)")
	f.format = fs.String("log-format", "", "json or text (env "+server.EnvLogFormat+", default json)")
	f.drainTimeout = fs.Duration("drain-timeout", 0, "how long shutdown waits for in-flight requests (env "+server.EnvDrainTimeout+", default 30s)")
	return f
}

// serveUsage prints the usage of "keypoold serve".
func serveUsage(w io.Writer) {
	fmt.Fprintln(w, "Usage: keypoold [serve] [flags]\n\nRun the server. Flags override KEYPOOL_* variables, which override the -config file.\nRun \"keypoold -h\" for the commands and the environment-only settings.\n\nFlags:")
	newServeFlags(w).fs.PrintDefaults()
}

// loadConfig builds the server configuration: the YAML file (-config or
// KEYPOOL_CONFIG), then the environment over it, then flags over both.
// For -h it prints the usage on w and returns flag.ErrHelp.
func loadConfig(args []string, e env, w io.Writer) (server.Config, error) {
	f := newServeFlags(io.Discard)
	if err := f.fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			serveUsage(w)
			return server.Config{}, err
		}
		return server.Config{}, &usageError{msg: "keypoold serve: " + err.Error(), help: serveUsage}
	}
	if f.fs.NArg() > 0 {
		return server.Config{}, &usageError{msg: fmt.Sprintf("keypoold serve: unexpected argument %q", f.fs.Arg(0)), help: serveUsage}
	}
	var cfg server.Config
	path := *f.configPath
	if path == "" {
		path = e.get(server.EnvConfig)
	}
	if path != "" {
		var err error
		if cfg, err = server.LoadFile(path, e.lookup); err != nil {
			return server.Config{}, err
		}
	}
	if err := cfg.ApplyEnv(e.lookup); err != nil {
		return server.Config{}, err
	}
	set := map[string]bool{}
	f.fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["listen"] {
		cfg.Listen = *f.listen
	}
	if set["database"] {
		cfg.Database = server.SecretURL(*f.database)
	}
	if set["data-dir"] {
		cfg.DataDir = *f.dataDir
	}
	if set["redis-url"] {
		cfg.RedisURL = server.SecretURL(*f.redisURL)
	}
	if set["external-database"] {
		cfg.ExternalDatabase = server.SecretURL(*f.extDB)
	}
	if set["log-level"] {
		cfg.LogLevel = *f.level
	}
	if set["log-format"] {
		cfg.LogFormat = *f.format
	}
	if set["drain-timeout"] {
		cfg.DrainTimeout = server.Duration(*f.drainTimeout)
	}
	return cfg, cfg.Validate()
}

// serve runs the server until ctx is done (SIGINT, SIGTERM).
func serve(ctx context.Context, args []string, e env, stdout, stderr io.Writer) error {
	cfg, err := loadConfig(args, e, stdout)
	if err != nil {
		return err
	}
	cfg.Output = stdout
	cfg.LogOutput = stderr
	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	srv, err := server.New(startCtx, cfg)
	cancel()
	if err != nil {
		return err
	}
	return srv.Run(ctx)
}
