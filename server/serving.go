package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keypool/keypool/store"
)

// serving is the server's life cycle: its HTTP servers, the requests and
// upgraded connections in flight, the background work, and the shutdown
// that ends them.
type serving struct {
	// ready logs "keypoold ready" once, when the first listener serves
	// (after the bind, so a port conflict never follows a ready line).
	ready    sync.Once
	inflight atomic.Int64
	draining atomic.Bool
	hijacked connSet
	onHijack func(net.Conn) // hijacked.add, bound once

	bgCancel context.CancelFunc
	bg       sync.WaitGroup

	mu       sync.Mutex // protects httpSrvs
	httpSrvs []*http.Server

	shutdownOnce sync.Once
	shutdownErr  error
	done         chan struct{} // closed when Shutdown has finished
}

// Run listens on [Config.Listen] and serves until ctx is done, then shuts
// down gracefully (see [Server.Shutdown]) and returns nil. It returns an
// error when it cannot listen or serving fails.
func (s *Server) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		_ = s.Shutdown(context.Background())
		return fmt.Errorf("server: listen: %w", err)
	}
	return s.Serve(ctx, ln)
}

// Serve serves on ln until ctx is done, then shuts down gracefully and
// returns nil (or Shutdown's error). It returns serving errors other than
// a shutdown.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.mu.Lock()
	s.httpSrvs = append(s.httpSrvs, hs)
	s.mu.Unlock()
	s.log.Info("listening", "addr", ln.Addr().String())
	s.ready.Do(func() {
		s.log.Info("keypoold ready", "addr", ln.Addr().String(), "database", s.cfg.Database,
			"services", len(s.pool.Services()), "redis", s.cfg.RedisURL != "", "external", s.cfg.ExternalDatabase != "")
	})
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			<-s.done // someone else called Shutdown: wait for it
			return s.shutdownErr
		}
		_ = s.Shutdown(context.Background())
		return fmt.Errorf("server: serve: %w", err)
	case <-ctx.Done():
		err := s.Shutdown(context.Background())
		<-errc
		return err
	}
}

// Shutdown stops the server gracefully: listeners close at once; requests
// in flight get up to [Config.DrainTimeout] (or until ctx is done) to
// finish, after which their connections are closed; hijacked connections
// (WebSockets) are closed; background work stops; pending usage records
// and key state changes are written; the store is closed. It may be called
// more than once and from several goroutines; every call waits for the
// first to finish and returns its result.
func (s *Server) Shutdown(ctx context.Context) error {
	s.shutdownOnce.Do(func() {
		defer close(s.done)
		s.shutdownErr = s.shutdown(ctx)
	})
	<-s.done
	return s.shutdownErr
}

func (s *Server) shutdown(ctx context.Context) error {
	start := time.Now()
	s.draining.Store(true)
	s.log.Info("shutting down: draining in-flight requests", "in_flight", s.inflight.Load(), "drain_timeout", time.Duration(s.cfg.DrainTimeout).String())
	dctx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.DrainTimeout))
	defer cancel()
	s.mu.Lock()
	srvs := s.httpSrvs
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, hs := range srvs {
		wg.Go(func() {
			if err := hs.Shutdown(dctx); err != nil {
				s.log.Warn("drain timeout reached; closing remaining connections", "err", err)
				_ = hs.Close()
			}
		})
	}
	wg.Wait()
	if n := s.hijacked.closeAll(); n > 0 {
		s.log.Info("closed upgraded connections", "count", n)
	}
	// Wait (briefly) for the handlers of closed connections to return, so
	// their usage records are written below.
	for deadline := time.Now().Add(5 * time.Second); s.inflight.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}

	s.bgCancel()
	_ = s.syncer.Close()
	s.bg.Wait()
	s.leases.releaseAll()

	var errs []error
	fctx, fcancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer fcancel()
	if err := s.usage.Close(fctx); err != nil {
		errs = append(errs, err)
	}
	if s.journal != nil {
		// Records the store did not take stay in the journal for the
		// next start.
		if err := s.journal.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	s.keys.Close(fctx) // writes the key states still queued
	errs = append(errs, s.closeResources())
	err := errors.Join(errs...)
	s.log.Info("shutdown complete", "took", time.Since(start).Round(time.Millisecond).String(),
		"usage_written", s.usage.Written(), "usage_dropped", s.usage.Dropped(), "error", errString(err))
	if s.logStop != nil {
		s.logStop()
		<-s.logDone
	}
	return err
}

// closeResources closes what New opened (safe on a partly built Server).
func (s *Server) closeResources() error {
	var errs []error
	if s.limiter != nil {
		errs = append(errs, s.limiter.Close())
	}
	if s.journal != nil {
		if err := s.journal.Close(); !errors.Is(err, store.ErrJournalClosed) {
			errs = append(errs, err)
		}
	}
	if s.rdb != nil {
		errs = append(errs, s.rdb.Close())
	}
	if s.ext != nil {
		errs = append(errs, s.ext.Close())
	}
	if s.st != nil {
		errs = append(errs, s.st.Close())
	}
	return errors.Join(errs...)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
