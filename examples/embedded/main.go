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
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/server"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	cfg := server.Config{
		Database:  "sqlite:./data-embedded/keypool.db",
		LogFormat: "text",
	}
	if k := os.Getenv("OPENAI_API_KEY"); k != "" {
		cfg.Services = []server.ServiceSpec{{
			Name:       "openai",
			BaseURL:    "https://api.openai.com",
			AuthScheme: "bearer",
			Keys:       []server.KeySpec{{KeyValue: keypool.Secret(k)}},
		}}
	}
	srv, err := server.New(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}

	// keypoold's routes (/v1/, /admin/, /key, /healthz, /readyz, /metrics)
	// beside one of our own.
	mux := http.NewServeMux()
	mux.Handle("/", srv.Handler())
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "keypool embedded: services %v\n", srv.Pool().Services())
	})
	hs := &http.Server{Addr: "127.0.0.1:8090", Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = hs.Shutdown(sctx)  // drain our listener first
		_ = srv.Shutdown(sctx) // then flush usage records, close the store
	}()
	log.Printf("serving on http://%s (try /hello, /healthz, /v1/openai/v1/models)", hs.Addr)
	if err := hs.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
	<-ctx.Done()
	_ = srv.Shutdown(context.Background()) // waits for the shutdown above
}
