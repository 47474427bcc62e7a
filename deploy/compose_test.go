package deploy

import (
	"context"
	"net/url"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
)

// composeEnv fills every secret of .env.example.
var composeEnv = map[string]string{
	"POSTGRES_PASSWORD":      "pgpass0123",
	"REDIS_PASSWORD":         "redispass0123",
	"KEYPOOL_ADMIN_TOKEN":    "admintoken0123",
	"KEYPOOL_ENCRYPTION_KEY": testEncKey,
}

func loadCompose(t *testing.T, env map[string]string, envFiles ...string) (*types.Project, error) {
	t.Helper()
	var kv []string
	for k, v := range env {
		kv = append(kv, k+"="+v)
	}
	fns := []cli.ProjectOptionsFn{cli.WithWorkingDirectory(".."), cli.WithEnv(kv), cli.WithName("keypool")}
	if len(envFiles) > 0 {
		fns = append(fns, cli.WithEnvFiles(envFiles...), cli.WithDotEnv)
	}
	opts, err := cli.NewProjectOptions([]string{"../compose.yaml"}, fns...)
	if err != nil {
		t.Fatal(err)
	}
	return opts.LoadProject(context.Background())
}

func TestComposeRefusesMissingSecrets(t *testing.T) {
	// .env.example as shipped leaves every secret empty: compose must
	// refuse to start, naming the first one missing.
	_, err := loadCompose(t, nil, "../.env.example")
	if err == nil || !regexp.MustCompile(`set (POSTGRES_PASSWORD|REDIS_PASSWORD|KEYPOOL_ADMIN_TOKEN|KEYPOOL_ENCRYPTION_KEY) in \.env`).MatchString(err.Error()) {
		t.Fatalf("compose with the empty .env.example: %v", err)
	}
	for missing := range composeEnv {
		env := map[string]string{}
		for k, v := range composeEnv {
			if k != missing {
				env[k] = v
			}
		}
		if _, err := loadCompose(t, env); err == nil || !strings.Contains(err.Error(), "set "+missing+" in .env") {
			t.Errorf("without %s: %v", missing, err)
		}
	}
}

func TestCompose(t *testing.T) {
	p, err := loadCompose(t, composeEnv, "../.env.example")
	if err != nil {
		t.Fatal(err)
	}
	names := p.ServiceNames()
	sort.Strings(names)
	replicas := []string{"keypoold-1", "keypoold-2", "keypoold-3"}
	if want := append([]string{}, append(replicas, "lb", "postgres", "redis")...); !slices.Equal(names, want) {
		t.Fatalf("services %v, want %v", names, want)
	}

	// Every service has a health check, and every dependency waits for
	// its target's.
	for name, s := range p.Services {
		if s.HealthCheck == nil || s.HealthCheck.Disable || len(s.HealthCheck.Test) < 2 || s.HealthCheck.Interval == nil {
			t.Errorf("%s has no health check: %+v", name, s.HealthCheck)
		}
		for dep, d := range s.DependsOn {
			if _, ok := p.Services[dep]; !ok {
				t.Errorf("%s depends on unknown %s", name, dep)
			}
			if d.Condition != types.ServiceConditionHealthy {
				t.Errorf("%s → %s: condition %q, want service_healthy", name, dep, d.Condition)
			}
		}
		if name != "lb" && len(s.Ports) > 0 {
			t.Errorf("%s publishes ports %+v; only the load balancer may", name, s.Ports)
		}
	}

	pg := p.Services["postgres"]
	if !slices.Equal([]string(pg.HealthCheck.Test), []string{"CMD", "pg_isready", "-U", "keypool", "-d", "keypool"}) {
		t.Errorf("postgres health check %v", pg.HealthCheck.Test)
	}
	if len(pg.Volumes) != 1 || pg.Volumes[0].Type != types.VolumeTypeVolume || pg.Volumes[0].Target != "/var/lib/postgresql/data" {
		t.Errorf("postgres volumes %+v, want a named volume for its data", pg.Volumes)
	} else if _, ok := p.Volumes[pg.Volumes[0].Source]; !ok {
		t.Errorf("postgres volume %s is not declared", pg.Volumes[0].Source)
	}
	if v := pg.Environment["POSTGRES_PASSWORD"]; v == nil || *v != composeEnv["POSTGRES_PASSWORD"] {
		t.Error("postgres does not take its password from the env file")
	}
	rd := p.Services["redis"]
	if !slices.Contains([]string(rd.Command), composeEnv["REDIS_PASSWORD"]) || rd.Environment["REDISCLI_AUTH"] == nil {
		t.Errorf("redis does not require the password: %v", rd.Command)
	}

	lb := p.Services["lb"]
	lbIP := lb.Networks["keypool"].Ipv4Address
	var dataVolume string
	for i, name := range replicas {
		s := p.Services[name]
		if s.Build == nil || s.Build.Context == "" || s.Image == "" {
			t.Errorf("%s: build %+v image %q", name, s.Build, s.Image)
		}
		if !slices.Equal([]string(s.HealthCheck.Test), []string{"CMD", "/keypoold", "healthcheck", "--ready"}) {
			t.Errorf("%s health check %v", name, s.HealthCheck.Test)
		}
		if !s.ReadOnly || !slices.Equal(s.CapDrop, []string{"ALL"}) || !slices.Contains(s.SecurityOpt, "no-new-privileges:true") {
			t.Errorf("%s: read_only %v cap_drop %v security_opt %v", name, s.ReadOnly, s.CapDrop, s.SecurityOpt)
		}
		// /data, the only writable path, is one named volume shared by
		// the replicas, not a tmpfs: the usage journal must outlive a
		// crashed container (a sibling or the restarted one replays it),
		// and the generated sign-in state secret must be the same on
		// every replica, or a sign-in started on one fails on another.
		if len(s.Tmpfs) != 0 || len(s.Volumes) != 1 || s.Volumes[0].Type != types.VolumeTypeVolume || s.Volumes[0].Target != "/data" || s.Volumes[0].ReadOnly {
			t.Errorf("%s: tmpfs %v volumes %+v, want one writable named volume at /data", name, s.Tmpfs, s.Volumes)
		} else {
			if _, ok := p.Volumes[s.Volumes[0].Source]; !ok {
				t.Errorf("%s: volume %s is not declared", name, s.Volumes[0].Source)
			}
			if dataVolume == "" {
				dataVolume = s.Volumes[0].Source
			} else if s.Volumes[0].Source != dataVolume {
				t.Errorf("%s has /data on %s, keypoold-1 on %s: the replicas must share it", name, s.Volumes[0].Source, dataVolume)
			}
		}
		if !slices.Equal([]string(s.Expose), []string{"8080"}) {
			t.Errorf("%s exposes %v", name, s.Expose)
		}
		wantDeps := []string{"postgres", "redis"}
		if i > 0 {
			wantDeps = append(wantDeps, "keypoold-1") // the first creates the schema
		}
		var deps []string
		for d := range s.DependsOn {
			deps = append(deps, d)
		}
		sort.Strings(deps)
		sort.Strings(wantDeps)
		if !slices.Equal(deps, wantDeps) {
			t.Errorf("%s depends on %v, want %v", name, deps, wantDeps)
		}
		env := map[string]string{}
		var envKeys []string
		for k, v := range s.Environment {
			envKeys = append(envKeys, k)
			if v != nil {
				env[k] = *v
			}
		}
		checkEnvNames(t, name, envKeys)
		db, err := url.Parse(env["KEYPOOL_DATABASE"])
		if err != nil || db.Scheme != "postgres" || db.Hostname() != "postgres" {
			t.Errorf("%s KEYPOOL_DATABASE %q", name, env["KEYPOOL_DATABASE"])
		} else if pw, _ := db.User.Password(); pw != composeEnv["POSTGRES_PASSWORD"] || db.User.Username() != *pg.Environment["POSTGRES_USER"] || db.Path != "/"+*pg.Environment["POSTGRES_DB"] {
			t.Errorf("%s KEYPOOL_DATABASE does not match the postgres service", name)
		}
		ru, err := url.Parse(env["KEYPOOL_REDIS_URL"])
		if err != nil || ru.Scheme != "redis" || ru.Hostname() != "redis" {
			t.Errorf("%s KEYPOOL_REDIS_URL %q", name, env["KEYPOOL_REDIS_URL"])
		} else if pw, _ := ru.User.Password(); pw != composeEnv["REDIS_PASSWORD"] {
			t.Errorf("%s KEYPOOL_REDIS_URL has the wrong password", name)
		}
		for k, want := range map[string]string{
			"KEYPOOL_ADMIN_TOKEN": composeEnv["KEYPOOL_ADMIN_TOKEN"], "KEYPOOL_ENCRYPTION_KEY": testEncKey,
			"KEYPOOL_LISTEN": ":8080", "KEYPOOL_DATA_DIR": "/data", "TMPDIR": "/data", "KEYPOOL_TRUSTED_PROXIES": lbIP,
			"AUTH_BASE_URL": "http://localhost:8080",
		} {
			if env[k] != want {
				t.Errorf("%s %s = %q, want %q", name, k, env[k], want)
			}
		}
		for _, k := range []string{"GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET"} {
			if _, ok := s.Environment[k]; !ok {
				t.Errorf("%s does not pass %s", name, k)
			}
		}
	}

	// The load balancer: the only published port, after every replica is
	// healthy, balancing over all of them.
	if len(lb.Ports) != 1 || lb.Ports[0].Target != 8080 || lb.Ports[0].Published != "8080" {
		t.Errorf("lb ports %+v, want 8080:8080", lb.Ports)
	}
	for _, r := range replicas {
		if _, ok := lb.DependsOn[r]; !ok {
			t.Errorf("lb does not wait for %s", r)
		}
	}
	if lbIP == "" {
		t.Fatal("the load balancer has no fixed address for KEYPOOL_TRUSTED_PROXIES")
	}
	subnet := p.Networks["keypool"].Ipam.Config
	if len(subnet) != 1 || !strings.HasPrefix(lbIP, strings.TrimSuffix(subnet[0].Subnet, "0/24")) {
		t.Errorf("lb address %s outside the network %+v", lbIP, subnet)
	}
	var caddyfile string
	for _, v := range lb.Volumes {
		if v.Target == "/etc/caddy/Caddyfile" {
			b, err := os.ReadFile(v.Source)
			if err != nil {
				t.Fatal(err)
			}
			caddyfile = string(b)
		}
	}
	if !strings.Contains(caddyfile, "reverse_proxy "+strings.Join([]string{"keypoold-1:8080", "keypoold-2:8080", "keypoold-3:8080"}, " ")) ||
		!strings.Contains(caddyfile, "health_uri /readyz") || !strings.Contains(caddyfile, ":8080 {") ||
		!strings.Contains(caddyfile, "handle /lb-healthz") {
		t.Errorf("Caddyfile does not balance over the replicas on :8080 with /readyz checks:\n%s", caddyfile)
	}
	if !slices.Contains([]string(lb.HealthCheck.Test), "http://127.0.0.1:8080/lb-healthz") {
		t.Errorf("lb health check %v", lb.HealthCheck.Test)
	}
}

// TestEnvExampleDocumentsEveryVariable: each ${VAR} of compose.yaml is in
// .env.example, under a comment.
func TestEnvExampleDocumentsEveryVariable(t *testing.T) {
	compose, err := os.ReadFile("../compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	example, err := os.ReadFile("../.env.example")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(example), "\n")
	documented := map[string]bool{}
	for i, l := range lines {
		name, _, ok := strings.Cut(l, "=")
		if !ok || strings.HasPrefix(l, "#") {
			continue
		}
		// A comment above, possibly across a group of related lines.
		for j := i - 1; j >= 0 && strings.TrimSpace(lines[j]) != ""; j-- {
			if strings.HasPrefix(lines[j], "#") {
				documented[name] = true
				break
			}
		}
		if !documented[name] {
			t.Errorf(".env.example: %s has no comment", name)
		}
	}
	refs := regexp.MustCompile(`\$\{([A-Z0-9_]+)`).FindAllStringSubmatch(string(compose), -1)
	if len(refs) < 5 {
		t.Fatalf("found only %d variables in compose.yaml", len(refs))
	}
	for _, m := range refs {
		if !documented[m[1]] {
			t.Errorf("compose.yaml uses ${%s}, which .env.example does not document", m[1])
		}
	}
}
