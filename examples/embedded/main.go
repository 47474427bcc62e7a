// Command embedded runs keypoold inside another program: the server
// package assembled with a service declared in code, its handler mounted
// beside the program's own routes, and a graceful shutdown on Ctrl-C.
//
//	OPENAI_API_KEY=sk-... go run ./examples/embedded
//
// It listens on 127.0.0.1:8090, keeps its data in ./data-embedded and
// prints the admin token it generates on first start.
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
	if err := run(ctx, ln, "./data-embedded", os.Getenv("OPENAI_API_KEY")); err != nil {
		log.Fatal(err)
	}
}

// run serves keypoold and one route of its own on ln until ctx ends, then
// shuts both down gracefully.
func run(ctx context.Context, ln net.Listener, dataDir, openaiKey string) error {
	cfg := server.Config{
		Database:  server.SecretURL("sqlite:" + filepath.Join(dataDir, "keypool.db")),
		LogFormat: "text",
	}
	if openaiKey != "" {
		cfg.Services = []server.ServiceSpec{{
			Name:       "openai",
			BaseURL:    "https://api.openai.com",
			AuthScheme: "bearer",
			Keys:       []server.KeySpec{{KeyValue: keypool.Secret(openaiKey)}},
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
