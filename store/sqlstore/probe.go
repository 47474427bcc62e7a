package sqlstore

import (
	"context"
	"errors"
	"fmt"
)

// ErrReadOnly reports that the database answers but does not take writes:
// a PostgreSQL standby (pg_is_in_recovery) or a session whose
// transactions are read-only (default_transaction_read_only, a database
// being failed over), where every write fails with SQLSTATE 25006.
var ErrReadOnly = errors.New("sqlstore: database is read-only")

// Probe reports whether the database really answers now, and on
// PostgreSQL whether it takes writes (else an error wrapping
// [ErrReadOnly]). It runs a query rather than trusting the last poll; a
// failure on a pooled connection the server has closed (a restart, a
// failover, pg_terminate_backend) is retried once on fresh connections, so
// a connection that reconnects at once does not count as unreachable.
func (s *Store) Probe(ctx context.Context) error {
	err := s.probeOnce(ctx)
	if err != nil && !errors.Is(err, ErrReadOnly) && ctx.Err() == nil && s.kind == kindPostgres {
		s.resetPool()
		err = s.probeOnce(ctx)
	}
	return err
}

func (s *Store) probeOnce(ctx context.Context) error {
	if s.kind != kindPostgres {
		var one int
		if err := s.rsql.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
			return fmt.Errorf("sqlstore: probe: %w", err)
		}
		return nil
	}
	var readOnly string
	var recovery bool
	if err := s.wsql.QueryRowContext(ctx, "SELECT current_setting('transaction_read_only'), pg_is_in_recovery()").
		Scan(&readOnly, &recovery); err != nil {
		return fmt.Errorf("sqlstore: probe: %w", err)
	}
	switch {
	case recovery:
		return fmt.Errorf("%w (a standby in recovery)", ErrReadOnly)
	case readOnly == "on":
		return fmt.Errorf("%w (transaction_read_only is on)", ErrReadOnly)
	}
	return nil
}
