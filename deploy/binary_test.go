package deploy

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// nonRootUID is the distroless "nonroot" user the image runs as.
const nonRootUID = 65532

// TestDockerfile checks the Dockerfile's promises that the binary test
// below relies on: the build stage runs deploy/build.sh, and the final
// stage is distroless static, non-root, with /data and port 8080.
func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var stages [][]string // instructions per stage, continuation lines joined
	var cur string
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "#") || (line == "" && cur == "") {
			continue
		}
		cur += " " + strings.TrimSuffix(line, "\\")
		if strings.HasSuffix(line, "\\") {
			continue
		}
		ins := strings.TrimSpace(cur)
		cur = ""
		if ins == "" {
			continue
		}
		if strings.HasPrefix(ins, "FROM ") {
			stages = append(stages, nil)
		}
		if len(stages) > 0 {
			stages[len(stages)-1] = append(stages[len(stages)-1], ins)
		}
	}
	if len(stages) != 2 {
		t.Fatalf("%d stages, want a build stage and a final stage", len(stages))
	}
	has := func(stage []string, re string) bool {
		for _, ins := range stage {
			if regexp.MustCompile(re).MatchString(ins) {
				return true
			}
		}
		return false
	}
	build, final := stages[0], stages[1]
	for _, re := range []string{`^FROM golang:\S+ AS build$`, `^RUN .*sh deploy/build\.sh /out/keypoold$`, `^ARG VERSION`, `^ARG COMMIT`} {
		if !has(build, re) {
			t.Errorf("build stage has no %s: %q", re, build)
		}
	}
	for _, re := range []string{
		`^FROM gcr\.io/distroless/static-debian\d+:nonroot$`,
		`^USER 65532:65532$`,
		`^EXPOSE 8080$`,
		`^ENV .*KEYPOOL_LISTEN=:8080`,
		`KEYPOOL_DATABASE=sqlite:/data/keypool\.db`,
		`KEYPOOL_DATA_DIR=/data`,
		`TMPDIR=/data`,
		`^VOLUME \["/data"\]$`,
		`^COPY --from=build --chown=65532:65532 /out/data /data$`,
		`^HEALTHCHECK .*CMD \["/keypoold", "healthcheck"\]$`,
		`^ENTRYPOINT \["/keypoold"\]$`,
	} {
		if !has(final, re) {
			t.Errorf("final stage has no %s: %q", re, final)
		}
	}
	if has(final, `^RUN `) {
		t.Error("the final stage runs commands: distroless has no shell")
	}
	ignore, err := os.ReadFile("../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{".git", ".env", "data", "deploy/helm"} {
		if !hasLine(strings.Split(string(ignore), "\n"), want) {
			t.Errorf(".dockerignore does not keep out %s", want)
		}
	}
}

func hasLine(lines []string, want string) bool {
	for _, l := range lines {
		if strings.TrimSpace(l) == want {
			return true
		}
	}
	return false
}

// built is keypoold as deploy/build.sh builds it, once per test run, in
// a directory every user may read (removed by TestMain).
var built struct {
	once     sync.Once
	dir, bin string
	err      error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// buildKeypoold returns the path of keypoold built by deploy/build.sh, as
// the Dockerfile's build stage runs it, with a test version and commit.
func buildKeypoold(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		if built.dir, built.err = os.MkdirTemp("", "keypool-deploy-bin-"); built.err != nil {
			return
		}
		if built.err = os.Chmod(built.dir, 0o755); built.err != nil {
			return
		}
		built.bin = filepath.Join(built.dir, "keypoold")
		build := exec.Command("sh", "build.sh", built.bin)
		build.Env = append(os.Environ(), "VERSION=v0.1.0-deploytest", "COMMIT=0123456789abcdef0123456789abcdef01234567")
		start := time.Now()
		if out, err := build.CombinedOutput(); err != nil {
			built.err = fmt.Errorf("build.sh: %v\n%s", err, out)
			return
		}
		t.Logf("deploy/build.sh took %s", time.Since(start).Round(time.Second))
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.bin
}

// TestStaticBinaryRunsAsNonRoot builds keypoold with deploy/build.sh, as
// the Dockerfile does, checks it is statically linked, then runs it as the
// image's non-root user in a read-only working tree with a data directory
// of its own: it must serve, and write nothing but that directory.
func TestStaticBinaryRunsAsNonRoot(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the image is linux")
	}
	asRoot := os.Getuid() == 0
	uid, gid := os.Getuid(), os.Getgid()
	if asRoot {
		uid, gid = nonRootUID, nonRootUID
	}
	// A tree the non-root user can traverse: t.TempDir is 0700.
	base, err := os.MkdirTemp("", "keypool-deploy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := buildKeypoold(t)
	checkStatic(t, bin)

	out, err := exec.Command(bin, "version").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"keypoold v0.1.0-deploytest\n", "commit:   0123456789abcdef0123456789abcdef01234567\n", "go:       go1."} {
		if !strings.Contains(string(out), want) {
			t.Errorf("keypoold version: no %q in\n%s", want, out)
		}
	}

	work := filepath.Join(base, "work") // the read-only working tree
	data := filepath.Join(base, "data")
	for _, d := range []string{work, data} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// keypoold runs with the environment and the config file of the
	// chart's Deployment (SQLite, the ConfigMap, extraEnv), its /data and
	// /etc/keypool mapped to these directories.
	r := mustRender(t, map[string]any{"config": fullValues()["config"], "extraEnv": fullValues()["extraEnv"], "log": map[string]any{"format": "text"}})
	cm := get[*corev1.ConfigMap](t, r, "ConfigMap")
	if err := os.WriteFile(filepath.Join(work, "config.yaml"), []byte(cm.Data["config.yaml"]), 0o444); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(data, uid, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(work, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(work, 0o755) })
	before := snapshot(t, base, data)

	cred := &syscall.SysProcAttr{}
	if asRoot {
		cred.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	}
	addr := freeAddr(t)
	env := append(podEnv(t, r, map[string]string{"/data": data, "/etc/keypool": work}, upstreamKeys),
		"HOME="+work, "KEYPOOL_LISTEN="+addr)

	// Left to its defaults (./data under the read-only working tree),
	// keypoold fails to start rather than write elsewhere.
	refused := exec.Command(bin, "serve", "-listen", "127.0.0.1:0")
	refused.Dir, refused.Env, refused.SysProcAttr = work, []string{"HOME=" + work, "TMPDIR=" + data}, cred
	if out, err := refused.CombinedOutput(); err == nil || !strings.Contains(string(out), "permission denied") {
		t.Errorf("serve with its data under the read-only tree: %v\n%s", err, out)
	}

	srv := startKeypoold(t, bin, work, env, cred)
	waitReady(t, "http://"+addr, srv.exited, &srv.logs)

	if got := procUIDs(t, srv.cmd.Process.Pid); got != fmt.Sprintf("%d\t%d\t%d\t%d", uid, uid, uid, uid) || (asRoot && strings.HasPrefix(got, "0\t")) {
		t.Errorf("keypoold runs with uids %q, want %d", got, uid)
	}
	hc := exec.Command(bin, "healthcheck", "--ready")
	hc.Env, hc.SysProcAttr = []string{"KEYPOOL_LISTEN=" + addr}, cred
	out, err = hc.CombinedOutput()
	if err != nil {
		t.Errorf("keypoold healthcheck --ready: %v\n%s", err, out)
	}
	// The service and key of the chart's config were loaded.
	if !strings.Contains(string(out), `"services":1,"keys":1`) {
		t.Errorf("keypoold healthcheck --ready: %s; want the chart config's 1 service and 1 key", out)
	}

	srv.stop(t)

	// Only the data directory changed, and it holds what keypoold keeps.
	after := snapshot(t, base, data)
	for p, s := range after {
		if before[p] != s {
			t.Errorf("keypoold wrote %s outside its data directory (%s → %s)", p, before[p], s)
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			t.Errorf("keypoold removed %s", p)
		}
	}
	for _, f := range []string{"keypool.db", "admin_token", "encryption.key"} {
		fi, err := os.Stat(filepath.Join(data, f))
		if err != nil {
			t.Errorf("data directory: %v", err)
			continue
		}
		if st := fi.Sys().(*syscall.Stat_t); int(st.Uid) != uid {
			t.Errorf("%s owned by %d, want %d", f, st.Uid, uid)
		}
		if f != "keypool.db" && fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
}

// checkStatic fails unless bin is a static executable.
func checkStatic(t *testing.T, bin string) {
	t.Helper()
	problems, err := dynamicLinking(bin)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("keypoold is not static: %s", p)
	}
}

// dynamicLinking lists what makes bin depend on a dynamic loader: a
// program interpreter (PT_INTERP) or needed shared libraries (DT_NEEDED).
func dynamicLinking(bin string) ([]string, error) {
	f, err := elf.Open(bin)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var problems []string
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			problems = append(problems, "PT_INTERP program header")
		}
	}
	needed, err := f.DynString(elf.DT_NEEDED)
	if err != nil {
		return nil, err
	}
	for _, lib := range needed {
		problems = append(problems, "DT_NEEDED "+lib)
	}
	return problems, nil
}

// TestDynamicLinkingDetected: the static check finds a dynamically linked
// program, so a build.sh that lost -static would fail the test above.
func TestDynamicLinkingDetected(t *testing.T) {
	var bin string
	for _, p := range []string{"/bin/sh", "/usr/bin/env", "/bin/ls"} {
		if problems, err := dynamicLinking(p); err == nil && len(problems) > 0 {
			bin = p
			break
		}
	}
	if bin == "" {
		t.Skip("no dynamically linked program on this machine to check against")
	}
	problems, _ := dynamicLinking(bin)
	if !strings.Contains(strings.Join(problems, ","), "PT_INTERP") || !strings.Contains(strings.Join(problems, ","), "DT_NEEDED libc.so") {
		t.Errorf("%s: %v, want PT_INTERP and DT_NEEDED libc.so…", bin, problems)
	}
}

// snapshot maps each path under root, except under skip, to its mode,
// size and modification time.
func snapshot(t *testing.T, root, skip string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == skip || strings.HasPrefix(p, skip+string(filepath.Separator)) {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		m[p] = fmt.Sprintf("%v %d %d", fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// waitReady polls /healthz and then /readyz of a starting process,
// bounded at 60 seconds.
func waitReady(t *testing.T, base string, exited <-chan error, logs *syncBuf) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, path := range []string{"/healthz", "/readyz"} {
		for {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			select {
			case err := <-exited:
				t.Fatalf("keypoold exited: %v\n%s", err, logs.String())
			case <-ctx.Done():
				t.Fatalf("%s not 200 within 60s: %v\n%s", path, err, logs.String())
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}

// procUIDs returns the real, effective, saved and filesystem uids of pid.
func procUIDs(t *testing.T, pid int) string {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Uid:"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatal("no Uid line")
	return ""
}

// syncBuf collects a process's output; Write and String may race.
type syncBuf struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuf) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
