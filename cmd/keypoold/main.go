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

// run executes one command line and returns the exit code.
func run(ctx context.Context, args []string, e env, stdin io.Reader, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "serve":
		err = serve(ctx, args, e, stdout, stderr)
	case "help", "-h", "--help":
		usage(stdout)
		return 0
	default:
		err = runCLI(ctx, cmd, args, e, stdin, stdout)
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 2
	case errors.Is(err, errUsage):
		fmt.Fprintln(stderr, "keypoold:", err)
		usage(stderr)
		return 2
	default:
		fmt.Fprintln(stderr, "keypoold:", err)
		return 1
	}
}

var errUsage = errors.New("usage")

func usage(w io.Writer) {
	fmt.Fprint(w, `Usage:
  keypoold [serve] [flags]      run the server (default)
  keypoold service add --name N --base-url URL [--auth-scheme S] [--rate-limit-rpm N] [--header K=V] …
  keypoold service list | get NAME | delete NAME
  keypoold key add --service S [--value V | value on stdin] [--weight N] [--label k=v] …
  keypoold key import --service S < keys.txt      (one key per line)
  keypoold key list [--service S] | delete ID
  keypoold team add --name N [--rpm-limit N] [--allowed-services a,b]
  keypoold team list
  keypoold user add --external-id E --team T | user list [--team T]
  keypoold token create --name N (--team T | --user U) [--scopes lease] [--rpm-limit N] [--expires-in 720h]
  keypoold token list [--team T] | revoke ID
  keypoold usage [--group-by service,day] [--since 2025-01-01]
  keypoold health

Server flags override KEYPOOL_* environment variables; run "keypoold serve -h".
CLI commands use KEYPOOL_URL (default http://127.0.0.1:8080) and
KEYPOOL_ADMIN_TOKEN (default: ./data/admin_token of a zero-config server).
`)
}

// loadConfig builds the server configuration: the YAML file (-config or
// KEYPOOL_CONFIG), then the environment over it, then flags over both.
func loadConfig(args []string, e env, stderr io.Writer) (server.Config, error) {
	fs := flag.NewFlagSet("keypoold serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		configPath   = fs.String("config", "", "YAML file of settings, services and keys (env "+server.EnvConfig+")")
		listen       = fs.String("listen", "", "listen address (env "+server.EnvListen+", default "+server.DefaultListen+")")
		database     = fs.String("database", "", "sqlite:PATH or postgres:// URL (env "+server.EnvDatabase+", default "+server.DefaultDatabase+")")
		dataDir      = fs.String("data-dir", "", "directory of generated secrets (env "+server.EnvDataDir+", default: the SQLite file's directory or ./data)")
		redisURL     = fs.String("redis-url", "", "Redis URL for limits shared by replicas (env "+server.EnvRedisURL+")")
		extDB        = fs.String("external-database", "", "external credential table, sqlite:PATH or postgres:// URL (env "+server.EnvExternalDatabase+")")
		logLevel     = fs.String("log-level", "", "debug, info, warn or error (env "+server.EnvLogLevel+", default info)")
		logFormat    = fs.String("log-format", "", "json or text (env "+server.EnvLogFormat+", default json)")
		drainTimeout = fs.Duration("drain-timeout", 0, "how long shutdown waits for in-flight requests (env "+server.EnvDrainTimeout+", default 30s)")
	)
	if err := fs.Parse(args); err != nil {
		return server.Config{}, err
	}
	if fs.NArg() > 0 {
		return server.Config{}, fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	var cfg server.Config
	path := *configPath
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
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["listen"] {
		cfg.Listen = *listen
	}
	if set["database"] {
		cfg.Database = server.SecretURL(*database)
	}
	if set["data-dir"] {
		cfg.DataDir = *dataDir
	}
	if set["redis-url"] {
		cfg.RedisURL = server.SecretURL(*redisURL)
	}
	if set["external-database"] {
		cfg.ExternalDatabase = server.SecretURL(*extDB)
	}
	if set["log-level"] {
		cfg.LogLevel = *logLevel
	}
	if set["log-format"] {
		cfg.LogFormat = *logFormat
	}
	if set["drain-timeout"] {
		cfg.DrainTimeout = server.Duration(*drainTimeout)
	}
	return cfg, cfg.Validate()
}

// serve runs the server until ctx is done (SIGINT, SIGTERM).
func serve(ctx context.Context, args []string, e env, stdout, stderr io.Writer) error {
	cfg, err := loadConfig(args, e, stderr)
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
