package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"github.com/keypool/keypool/server"
)

// version and commit are stamped by the release build
// (-ldflags "-X main.version=v0.1.0 -X main.commit=…", see deploy/build.sh).
// When empty, "keypoold version" reads them from the build information.
var (
	version string
	commit  string
)

// localCommand is a command that runs without the admin API.
type localCommand struct {
	name, args, summary string
	run                 func(ctx context.Context, fs *flag.FlagSet, args []string, e env, stdout io.Writer) error
}

// localCommands are listed in the help after serve.
var localCommands = []localCommand{
	{"healthcheck", "[--ready] [flags]", "exit 0 when the local server answers /healthz (or /readyz), else 1", healthcheck},
	{"version", "", "the module version, commit and Go version of this binary", printVersion},
}

// findLocal returns the local command named name, or nil.
func findLocal(name string) *localCommand {
	for i := range localCommands {
		if localCommands[i].name == name {
			return &localCommands[i]
		}
	}
	return nil
}

// runLocal runs a local command with its own flag set.
func runLocal(ctx context.Context, c *localCommand, args []string, e env, stdout io.Writer) error {
	fs := flag.NewFlagSet("keypoold "+c.name, flag.ContinueOnError)
	fs.Usage = flagUsage(fs, c.args, c.summary)
	return c.run(ctx, fs, args, e, stdout)
}

// buildInfo is what "keypoold version" prints.
type buildInfo struct {
	Module, Version, Commit, GoVersion, Platform string
	Modified                                     bool
}

// readBuildInfo combines the stamped version and commit with the
// binary's build information (module version for "go install …@v0.1.0",
// VCS revision for a build inside a checkout).
func readBuildInfo(stampedVersion, stampedCommit string, bi *debug.BuildInfo, ok bool) buildInfo {
	info := buildInfo{Module: "github.com/keypool/keypool", Version: "(devel)", Commit: "unknown",
		GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if ok {
		if bi.Main.Path != "" {
			info.Module = bi.Main.Path
		}
		if bi.Main.Version != "" {
			info.Version = bi.Main.Version
		}
		if bi.GoVersion != "" {
			info.GoVersion = bi.GoVersion
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				info.Commit = s.Value
			case "vcs.modified":
				info.Modified = s.Value == "true"
			}
		}
	}
	if stampedVersion != "" {
		info.Version = stampedVersion
	}
	if stampedCommit != "" {
		info.Commit = stampedCommit
	}
	return info
}

func printVersion(_ context.Context, fs *flag.FlagSet, args []string, _ env, stdout io.Writer) error {
	if _, err := parseArgs(fs, args, 0, "", stdout); err != nil {
		return err
	}
	bi, ok := debug.ReadBuildInfo()
	info := readBuildInfo(version, commit, bi, ok)
	c := info.Commit
	if info.Modified {
		c += " (modified)"
	}
	fmt.Fprintf(stdout, "keypoold %s\nmodule:   %s\ncommit:   %s\ngo:       %s\nplatform: %s\n",
		info.Version, info.Module, c, info.GoVersion, info.Platform)
	return nil
}

// serverURL is the base URL of the server the CLI talks to: KEYPOOL_URL,
// else the loopback address on the port of KEYPOOL_LISTEN, else
// http://127.0.0.1:8080.
func serverURL(e env) string {
	if u := e.get(envURL); u != "" {
		return strings.TrimRight(u, "/")
	}
	if l := e.get(server.EnvListen); l != "" {
		host, port, err := net.SplitHostPort(l)
		if err == nil && port != "" {
			if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
				host = "127.0.0.1"
			}
			return "http://" + net.JoinHostPort(host, port)
		}
	}
	return "http://127.0.0.1:8080"
}

// healthcheck GETs /healthz (or /readyz) of the local server, for
// container health checks in images without curl. Any answer but 200, or
// none within the timeout, is an error (exit 1).
func healthcheck(ctx context.Context, fs *flag.FlagSet, args []string, e env, stdout io.Writer) error {
	ready := fs.Bool("ready", false, "check /readyz (store reachable, pools loaded) instead of /healthz")
	base := fs.String("url", "", "server base URL (default: $KEYPOOL_URL, else 127.0.0.1 on the port of $KEYPOOL_LISTEN, else http://127.0.0.1:8080)")
	timeout := fs.Duration("timeout", 3*time.Second, "how long to wait for the answer")
	if _, err := parseArgs(fs, args, 0, "", stdout); err != nil {
		return err
	}
	u := strings.TrimRight(*base, "/")
	if u == "" {
		u = serverURL(e)
	}
	path := "/healthz"
	if *ready {
		path = "/readyz"
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u+path, nil)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	hc := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // drop the URL: it may carry credentials
		}
		return fmt.Errorf("healthcheck %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck %s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	fmt.Fprintf(stdout, "%s %s\n", path, strings.TrimSpace(string(body)))
	return nil
}
