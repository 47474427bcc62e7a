package sqlstore

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"time"

	"gorm.io/gorm"

	"github.com/keypool/keypool/store"
)

type tierRow struct {
	Name        string    `gorm:"column:name;primaryKey"`
	Description string    `gorm:"column:description"`
	Features    string    `gorm:"column:features"`
	CreatedAt   time.Time `gorm:"column:created_at;autoCreateTime:false"`
	UpdatedAt   time.Time `gorm:"column:updated_at;autoUpdateTime:false"`
}

func (tierRow) TableName() string { return "tiers" }

func tierFromRow(r *tierRow) (store.Tier, error) {
	t := store.Tier{Name: r.Name, Description: r.Description, CreatedAt: r.CreatedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC()}
	if err := decodeJSON(r.Features, &t.Features); err != nil {
		return t, fmt.Errorf("tier %q features: %w", r.Name, err)
	}
	return t, nil
}

// CreateTier inserts a tier; its name must be unique.
func (s *Store) CreateTier(ctx context.Context, t *store.Tier) error {
	if err := t.Validate(); err != nil {
		return fmt.Errorf("sqlstore: create tier: %w", err)
	}
	feats, err := encodeJSON(t.Features, false)
	if err != nil {
		return fmt.Errorf("sqlstore: create tier: %w", err)
	}
	now := s.now()
	row := tierRow{Name: t.Name, Description: t.Description, Features: feats, CreatedAt: now, UpdatedAt: now}
	if err := s.write(ctx, "create tier", true, func(tx *gorm.DB) error {
		return tx.Create(&row).Error
	}); err != nil {
		return err
	}
	t.CreatedAt, t.UpdatedAt = now, now
	return nil
}

// GetTier returns the tier of that name.
func (s *Store) GetTier(ctx context.Context, name string) (store.Tier, error) {
	var row tierRow
	if err := s.r.WithContext(ctx).Where("name = ?", name).Take(&row).Error; err != nil {
		return store.Tier{}, mapErr("get tier "+strconv.Quote(name), err)
	}
	t, err := tierFromRow(&row)
	if err != nil {
		return store.Tier{}, fmt.Errorf("sqlstore: get tier: %w", err)
	}
	return t, nil
}

// ListTiers returns every tier, ordered by name.
func (s *Store) ListTiers(ctx context.Context) ([]store.Tier, error) {
	var rows []tierRow
	if err := s.r.WithContext(ctx).Order("name").Find(&rows).Error; err != nil {
		return nil, mapErr("list tiers", err)
	}
	out := make([]store.Tier, len(rows))
	for i := range rows {
		t, err := tierFromRow(&rows[i])
		if err != nil {
			return nil, fmt.Errorf("sqlstore: list tiers: %w", err)
		}
		out[i] = t
	}
	return out, nil
}

// UpdateTier replaces the description and features of tier t.Name.
func (s *Store) UpdateTier(ctx context.Context, t *store.Tier) error {
	if err := t.Validate(); err != nil {
		return fmt.Errorf("sqlstore: update tier: %w", err)
	}
	feats, err := encodeJSON(t.Features, false)
	if err != nil {
		return fmt.Errorf("sqlstore: update tier: %w", err)
	}
	now := s.now()
	if err := s.write(ctx, "update tier "+strconv.Quote(t.Name), true, func(tx *gorm.DB) error {
		return affected(tx.Model(&tierRow{}).Where("name = ?", t.Name).Updates(map[string]any{
			"description": t.Description, "features": feats, "updated_at": now,
		}))
	}); err != nil {
		return err
	}
	t.UpdatedAt = now
	return nil
}

// DeleteTier deletes a tier no key belongs to.
func (s *Store) DeleteTier(ctx context.Context, name string) error {
	return s.write(ctx, "delete tier "+strconv.Quote(name), true, func(tx *gorm.DB) error {
		var n int64
		if err := tx.Model(&keyRow{}).Where("tier = ?", name).Count(&n).Error; err != nil {
			return err
		}
		if n > 0 {
			return fmt.Errorf("%w: %d keys belong to tier %q; move or delete them first", store.ErrConflict, n, name)
		}
		return affected(tx.Where("name = ?", name).Delete(&tierRow{}))
	})
}

// checkTiers reports ErrInvalid when a non-empty name in names is no tier.
func checkTiers(tx *gorm.DB, names []string) error {
	slices.Sort(names)
	names = slices.Compact(names)
	names = slices.DeleteFunc(names, func(n string) bool { return n == "" })
	if len(names) == 0 {
		return nil
	}
	var found []string
	if err := tx.Model(&tierRow{}).Where("name IN ?", names).Pluck("name", &found).Error; err != nil {
		return err
	}
	for _, n := range names {
		if !slices.Contains(found, n) {
			return fmt.Errorf("%w: tier %q does not exist", store.ErrInvalid, n)
		}
	}
	return nil
}

// fillFeatures sets each key's Features from its tier.
func (s *Store) fillFeatures(ctx context.Context, keys []store.Key) error {
	tiered := false
	for i := range keys {
		if keys[i].Tier != "" {
			tiered = true
			break
		}
	}
	if !tiered {
		return nil
	}
	tiers, err := s.ListTiers(ctx)
	if err != nil {
		return err
	}
	byName := make(map[string]map[string]int, len(tiers))
	for _, t := range tiers {
		byName[t.Name] = t.Features
	}
	for i := range keys {
		if f, ok := byName[keys[i].Tier]; ok {
			keys[i].Features = f
		}
	}
	return nil
}

var _ store.TierStore = (*Store)(nil)
