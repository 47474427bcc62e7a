// Command embedded runs keypoold inside another program: the server
// package assembled with a service declared in code and a selector of its
// own registered by name, its handler mounted beside the program's own
// routes, and a graceful shutdown on Ctrl-C.
//
//	OPENAI_API_KEY=sk-... go run ./examples/embedded
//
// It listens on 127.0.0.1:8090, keeps its data in ./data-embedded and
// prints the admin token it generates on first start (or uses
// KEYPOOL_ADMIN_TOKEN). The selector it registers, "free_first", is then
// a name the admin API and the configuration file accept:
//
//	curl -H "Authorization: Bearer $ADMIN" -d '{"name":"echo","base_url":"http://127.0.0.1:9000","selector":"free_first"}' \
//	  http://127.0.0.1:8090/admin/services
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/server"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ln, err := net.Listen("tcp", "127.0.0.1:8090")
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("serving on http://%s (try /hello, /healthz, /v1/openai/v1/models)", ln.Addr())
	opts := options{dataDir: "./data-embedded", openaiKey: os.Getenv("OPENAI_API_KEY"), adminToken: os.Getenv("KEYPOOL_ADMIN_TOKEN")}
	if err := run(ctx, ln, opts); err != nil {
		log.Fatal(err)
	}
}

// freeFirst picks a key labelled tier=free when one is available and
// falls back to the others; within a tier it defers to round robin.
type freeFirst struct {
	rr keypool.RoundRobin
}

// Select implements keypool.Selector.
func (s *freeFirst) Select(c *keypool.Candidates) *keypool.Candidate {
	for i := 0; i < c.Len(); i++ {
		if k := s.rr.Select(c); k.Label("tier") == "free" {
			return k
		}
	}
	return s.rr.Select(c)
}

// options are what run needs from the command line and environment.
type options struct {
	dataDir    string
	openaiKey  string // "": no openai service declared
	adminToken string // "": generated in dataDir
}

// run serves keypoold and one route of its own on ln until ctx ends, then
// shuts both down gracefully.
func run(ctx context.Context, ln net.Listener, o options) error {
	cfg := server.Config{
		Database:   server.SecretURL("sqlite:" + filepath.Join(o.dataDir, "keypool.db")),
		AdminToken: keypool.Secret(o.adminToken),
		LogFormat:  "text",
		// A policy registered by name: every service may now say
		// "selector": "free_first", through the admin API or the file.
		// Each service gets its own instance.
		Selectors: map[string]func() keypool.Selector{
			"free_first": func() keypool.Selector { return &freeFirst{} },
		},
	}
	if o.openaiKey != "" {
		cfg.Services = []server.ServiceSpec{{
			Name:       "openai",
			BaseURL:    "https://api.openai.com",
			AuthScheme: "bearer",
			Selector:   "free_first",
			Keys:       []server.KeySpec{{KeyValue: keypool.Secret(o.openaiKey)}},
		}}
	}
	srv, err := server.New(ctx, cfg)
	if err != nil {
		return err
	}

	// keypoold's routes (/v1/, /admin/, /key, /healthz, /readyz, /metrics)
	// beside one of our own.
	mux := http.NewServeMux()
	mux.Handle("/", srv.Handler())
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "keypool embedded: services %v\n", srv.Pool().Services())
	})
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = hs.Shutdown(sctx)      // drain our listener first
		done <- srv.Shutdown(sctx) // then flush usage records, close the store
	}()
	if err := hs.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return <-done
}
