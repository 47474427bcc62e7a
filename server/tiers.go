package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"

	"github.com/keypool/keypool/store"
)

// TierSpec is a tier declared in the configuration file:
//
//	tiers:
//	  - name: pro
//	    features: {image-generation: 100}
//
// Every key of the tier serves its features, each at most its requests
// per minute in any minute. At start the file's features replace the
// stored ones; a stored description is kept when the file gives none.
type TierSpec struct {
	Name        string         `json:"name" yaml:"name"`
	Description string         `json:"description,omitempty" yaml:"description,omitempty"`
	Features    map[string]int `json:"features" yaml:"features"`
}

func validateTiers(specs []TierSpec) error {
	seen := map[string]bool{}
	for i, sp := range specs {
		t := store.Tier{Name: sp.Name, Description: sp.Description, Features: sp.Features}
		if err := t.Validate(); err != nil {
			return fmt.Errorf("server: tiers[%d]: %w", i, err)
		}
		if seen[sp.Name] {
			return fmt.Errorf("server: tiers[%d]: tier %q declared twice", i, sp.Name)
		}
		seen[sp.Name] = true
	}
	return nil
}

// applyTiers creates or updates the tiers declared in the configuration.
func applyTiers(ctx context.Context, st store.Store, specs []TierSpec, log *slog.Logger) error {
	if len(specs) == 0 {
		return nil
	}
	ts, ok := st.(store.TierStore)
	if !ok {
		return errors.New("server: config tiers: the store keeps no tiers")
	}
	for _, sp := range specs {
		t := store.Tier{Name: sp.Name, Description: sp.Description, Features: maps.Clone(sp.Features)}
		old, err := ts.GetTier(ctx, sp.Name)
		switch {
		case errors.Is(err, store.ErrNotFound):
			if err := ts.CreateTier(ctx, &t); err != nil {
				return fmt.Errorf("server: config tier %q: %w", sp.Name, err)
			}
			log.Info("config: tier created", "tier", sp.Name)
		case err != nil:
			return fmt.Errorf("server: config tier %q: %w", sp.Name, err)
		default:
			if t.Description == "" {
				t.Description = old.Description
			}
			if t.Description == old.Description && maps.Equal(t.Features, old.Features) {
				continue
			}
			if err := ts.UpdateTier(ctx, &t); err != nil {
				return fmt.Errorf("server: config tier %q: %w", sp.Name, err)
			}
			log.Info("config: tier updated", "tier", sp.Name)
		}
	}
	return nil
}
