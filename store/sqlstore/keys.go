package sqlstore

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"gorm.io/gorm"

	"github.com/keypool/keypool"
	"github.com/keypool/keypool/store"
	"github.com/keypool/keypool/store/seal"
)

// Services returns every service, ordered by name.
func (s *Store) Services(ctx context.Context) ([]store.Service, error) {
	var rows []serviceRow
	if err := s.r.WithContext(ctx).Order("name").Find(&rows).Error; err != nil {
		return nil, mapErr("list services", err)
	}
	out := make([]store.Service, len(rows))
	for i := range rows {
		sv, err := serviceFromRow(&rows[i])
		if err != nil {
			return nil, fmt.Errorf("sqlstore: list services: %w", err)
		}
		out[i] = sv
	}
	return out, nil
}

// Version returns the change counter bumped by every write to services
// and keys (except [Store.AddKeySpend] and [Store.Rewrap], which change
// nothing a pool reloads for).
func (s *Store) Version(ctx context.Context) (string, error) {
	var n int64
	if err := s.r.WithContext(ctx).Raw("SELECT counter FROM meta WHERE name = ?", metaVersion).Scan(&n).Error; err != nil {
		return "", mapErr("version", err)
	}
	return strconv.FormatInt(n, 10), nil
}

func validServiceName(name string) error {
	if name == "" || strings.ContainsAny(name, "/?#% \t\r\n") {
		return fmt.Errorf("%w: service name %q must be non-empty, without '/', '?', '#', '%%' or spaces", store.ErrInvalid, name)
	}
	return nil
}

// CreateService inserts a service; its name must be unique.
func (s *Store) CreateService(ctx context.Context, sv *store.Service) error {
	if err := validServiceName(sv.Name); err != nil {
		return fmt.Errorf("sqlstore: create service: %w", err)
	}
	now := s.now()
	row, err := serviceToRow(sv)
	if err != nil {
		return fmt.Errorf("sqlstore: create service: %w", err)
	}
	row.CreatedAt, row.UpdatedAt = now, now
	if err := s.write(ctx, "create service", true, func(tx *gorm.DB) error {
		return tx.Create(&row).Error
	}); err != nil {
		return err
	}
	sv.CreatedAt, sv.UpdatedAt = now, now
	return nil
}

// GetService returns the service of that name.
func (s *Store) GetService(ctx context.Context, name string) (store.Service, error) {
	var row serviceRow
	if err := s.r.WithContext(ctx).Where("name = ?", name).Take(&row).Error; err != nil {
		return store.Service{}, mapErr("get service "+strconv.Quote(name), err)
	}
	sv, err := serviceFromRow(&row)
	if err != nil {
		return store.Service{}, fmt.Errorf("sqlstore: get service: %w", err)
	}
	return sv, nil
}

// UpdateService replaces every field of the service named sv.Name except
// CreatedAt.
func (s *Store) UpdateService(ctx context.Context, sv *store.Service) error {
	row, err := serviceToRow(sv)
	if err != nil {
		return fmt.Errorf("sqlstore: update service: %w", err)
	}
	now := s.now()
	err = s.write(ctx, "update service "+strconv.Quote(sv.Name), true, func(tx *gorm.DB) error {
		res := tx.Model(&serviceRow{}).Where("name = ?", sv.Name).Updates(map[string]any{
			"display_name": row.DisplayName, "description": row.Description, "disabled": row.Disabled, "base_url": row.BaseURL, "auth_scheme": row.AuthScheme,
			"rate_limit_rpm": row.RateLimitRPM, "max_in_flight": row.MaxInFlight,
			"proxy_headers": row.ProxyHeaders, "selector": row.Selector,
			"external_name": row.ExternalName, "prices": row.Prices, "llm_family": row.LLMFamily, "limits": row.Limits,
			"key_policy": row.KeyPolicy, "kind": row.Kind, "routes": row.Routes, "router": row.Router,
			"header_timeout_ms": row.HeaderMS, "idle_timeout_ms": row.IdleMS, "request_timeout_ms": row.RequestMS,
			"updated_at": now,
		})
		return affected(res)
	})
	if err != nil {
		return err
	}
	sv.UpdatedAt = now
	return nil
}

// DeleteService deletes a service and, by cascade, its keys.
func (s *Store) DeleteService(ctx context.Context, name string) error {
	return s.write(ctx, "delete service "+strconv.Quote(name), true, func(tx *gorm.DB) error {
		return affected(tx.Where("name = ?", name).Delete(&serviceRow{}))
	})
}

// affected turns a result that touched no row into ErrNotFound.
func affected(res *gorm.DB) error {
	if res.Error != nil {
		return res.Error
	}
	if res.RowsAffected == 0 {
		return store.ErrNotFound
	}
	return nil
}

// keyAD is the associated data that binds a sealed value to its row.
func keyAD(id, service string) []byte {
	return []byte("keypool/key\x00" + id + "\x00" + service)
}

func (s *Store) fingerprint(secret keypool.Secret) []byte {
	m := hmac.New(sha256.New, s.fpKey)
	m.Write([]byte(secret.Reveal()))
	return m.Sum(nil)
}

func validStatus(st string) error {
	switch st {
	case store.StatusActive, store.StatusDisabled, store.StatusInvalid, store.StatusExhausted:
		return nil
	}
	return fmt.Errorf("%w: unknown key status %q", store.ErrInvalid, st)
}

// sealKey fills row's ciphertext, key version, fingerprint and hint.
func (s *Store) sealKey(row *keyRow, secret keypool.Secret) error {
	ct, err := s.keyring.Seal([]byte(secret.Reveal()), keyAD(row.ID, row.Service))
	if err != nil {
		return err
	}
	row.Ciphertext = ct
	row.KeyVersion = int64(s.keyring.Current())
	row.Fingerprint = s.fingerprint(secret)
	row.Hint = secret.Hint()
	return nil
}

func (s *Store) keyToRow(k *store.Key) (keyRow, error) {
	r := keyRow{
		ID: k.ID, Service: k.Service, Weight: k.Weight, Priority: k.Priority,
		RateLimitRPM: k.RateLimitRPM, MaxInFlight: k.MaxInFlight,
		BalanceTotal: k.BalanceTotal, BalanceUsed: k.BalanceUsed, BalanceUnit: k.BalanceUnit,
		AccountEmail: k.AccountEmail, Tier: k.Tier, Status: k.Status, StatusReason: k.StatusReason, Origin: k.Origin,
	}
	if r.Status == "" {
		r.Status = store.StatusActive
	}
	if r.Origin == "" {
		r.Origin = "local"
	}
	if err := validStatus(r.Status); err != nil {
		return r, err
	}
	var err error
	r.Labels, err = encodeJSON(k.Labels, len(k.Labels) == 0)
	return r, err
}

func (s *Store) keyFromRow(r *keyRow) (store.Key, error) {
	k := store.Key{
		ID: r.ID, Service: r.Service, Hint: r.Hint, Weight: r.Weight, Priority: r.Priority,
		RateLimitRPM: r.RateLimitRPM, MaxInFlight: r.MaxInFlight,
		BalanceTotal: r.BalanceTotal, BalanceUsed: r.BalanceUsed, BalanceUnit: r.BalanceUnit,
		AccountEmail: r.AccountEmail, Tier: r.Tier, Status: r.Status, StatusReason: r.StatusReason, Origin: r.Origin,
		CreatedAt: r.CreatedAt.UTC(), UpdatedAt: r.UpdatedAt.UTC(),
	}
	if err := decodeJSON(r.Labels, &k.Labels); err != nil {
		return k, fmt.Errorf("key %s labels: %w", r.ID, err)
	}
	if s.keyring == nil {
		return k, fmt.Errorf("key %s: %w", r.ID, ErrNoKeyring)
	}
	pt, err := s.keyring.Open(r.Ciphertext, keyAD(r.ID, r.Service))
	if err != nil {
		return k, fmt.Errorf("key %s: %w", r.ID, err)
	}
	k.Secret = keypool.Secret(pt)
	return k, nil
}

// keyColumns are the columns Keys reads, in scan order.
const keyColumns = "id, service, ciphertext, hint, weight, priority, rate_limit_rpm, max_in_flight, labels, " +
	"balance_total, balance_used, balance_unit, account_email, tier, status, status_reason, origin, created_at, updated_at"

// Keys returns the keys of one service, or of every service when service
// is "", with their secrets opened; ordered by service, then creation.
// It fails as a whole if any value cannot be opened.
func (s *Store) Keys(ctx context.Context, service string) ([]store.Key, error) {
	if s.keyring == nil {
		// Open refuses a keyring-less database that holds keys, so there
		// are none to return unless they were written since.
		var n int64
		if err := s.r.WithContext(ctx).Raw("SELECT COUNT(*) FROM keys").Scan(&n).Error; err != nil {
			return nil, mapErr("list keys", err)
		}
		if n > 0 {
			return nil, fmt.Errorf("sqlstore: list keys: %w", ErrNoKeyring)
		}
		return []store.Key{}, nil
	}
	// Scanned by hand: gorm's reflection costs more than the decryption
	// when loading 100 000 keys. Sorted in Go, so the database streams
	// rows in storage order.
	q := "SELECT " + keyColumns + " FROM keys"
	var args []any
	if service != "" {
		q += " WHERE service = ?"
		args = append(args, service)
	}
	// A count first sizes the result: growing a slice of 100 000 keys
	// copies more than the count costs.
	var n int64
	cq := s.r.WithContext(ctx).Model(&keyRow{})
	if service != "" {
		cq = cq.Where("service = ?", service)
	}
	if err := cq.Count(&n).Error; err != nil {
		return nil, mapErr("list keys", err)
	}
	rows, err := s.r.WithContext(ctx).Raw(q, args...).Rows()
	if err != nil {
		return nil, mapErr("list keys", err)
	}
	defer rows.Close()
	out := make([]store.Key, 0, n+16)
	var (
		ct     sql.RawBytes
		labels sql.RawBytes
	)
	for rows.Next() {
		var k store.Key
		if err := rows.Scan(&k.ID, &k.Service, &ct, &k.Hint, &k.Weight, &k.Priority, &k.RateLimitRPM, &k.MaxInFlight,
			&labels, &k.BalanceTotal, &k.BalanceUsed, &k.BalanceUnit, &k.AccountEmail, &k.Tier, &k.Status, &k.StatusReason,
			&k.Origin, &k.CreatedAt, &k.UpdatedAt); err != nil {
			return nil, mapErr("list keys", err)
		}
		k.CreatedAt, k.UpdatedAt = k.CreatedAt.UTC(), k.UpdatedAt.UTC()
		if len(labels) > 0 {
			if err := json.Unmarshal(labels, &k.Labels); err != nil {
				return nil, fmt.Errorf("sqlstore: list keys: key %s labels: %w", k.ID, err)
			}
		}
		pt, err := s.keyring.Open(ct, keyAD(k.ID, k.Service))
		if err != nil {
			return nil, fmt.Errorf("sqlstore: list keys: key %s: %w", k.ID, err)
		}
		k.Secret = keypool.Secret(pt)
		out = append(out, k)
	}
	if err := rows.Err(); err != nil {
		return nil, mapErr("list keys", err)
	}
	if err := s.fillFeatures(ctx, out); err != nil {
		return nil, fmt.Errorf("sqlstore: list keys: %w", err)
	}
	return sortKeys(out), nil
}

// sortKeys orders keys by service, creation time and id. It sorts indexes,
// not the large Key values.
func sortKeys(ks []store.Key) []store.Key {
	cmp := func(a, b *store.Key) int {
		if c := strings.Compare(a.Service, b.Service); c != 0 {
			return c
		}
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	}
	idx := make([]int32, len(ks))
	sorted := true
	for i := range idx {
		idx[i] = int32(i)
		if i > 0 && sorted && cmp(&ks[i-1], &ks[i]) > 0 {
			sorted = false
		}
	}
	if sorted {
		return ks
	}
	slices.SortFunc(idx, func(a, b int32) int { return cmp(&ks[a], &ks[b]) })
	out := make([]store.Key, len(ks))
	for i, j := range idx {
		out[i] = ks[j]
	}
	return out
}

// CreateKeys inserts keys all or nothing. A key with an ID keeps it;
// others get a new "key_…" id. Status defaults to active and Origin to
// "local"; Hint is set from the secret. A value already present in its
// service is ErrConflict; an unknown service is ErrInvalid.
func (s *Store) CreateKeys(ctx context.Context, keys []*store.Key) error {
	if len(keys) == 0 {
		return nil
	}
	if s.keyring == nil || s.fpKey == nil {
		return fmt.Errorf("sqlstore: create keys: %w", ErrNoKeyring)
	}
	now := s.now()
	rows := make([]keyRow, len(keys))
	for i, k := range keys {
		if k == nil || k.Service == "" || k.Secret.IsZero() {
			return fmt.Errorf("sqlstore: create keys: key %d of %d: %w: service and secret are required", i+1, len(keys), store.ErrInvalid)
		}
		row, err := s.keyToRow(k)
		if err != nil {
			return fmt.Errorf("sqlstore: create keys: key %d of %d: %w", i+1, len(keys), err)
		}
		if row.ID == "" {
			row.ID = newID("key")
		}
		if err := s.sealKey(&row, k.Secret); err != nil {
			return fmt.Errorf("sqlstore: create keys: key %d of %d: %w", i+1, len(keys), err)
		}
		row.CreatedAt, row.UpdatedAt = now, now
		rows[i] = row
	}
	if err := s.write(ctx, "create keys", true, func(tx *gorm.DB) error {
		tiers := make([]string, 0, 1)
		for i := range rows {
			tiers = append(tiers, rows[i].Tier)
		}
		if err := checkTiers(tx, tiers); err != nil {
			return err
		}
		return tx.CreateInBatches(&rows, 500).Error
	}); err != nil {
		return err
	}
	for i, k := range keys {
		k.ID, k.Hint, k.Status, k.Origin = rows[i].ID, rows[i].Hint, rows[i].Status, rows[i].Origin
		k.CreatedAt, k.UpdatedAt = now, now
	}
	return nil
}

// GetKey returns one key with its secret opened.
func (s *Store) GetKey(ctx context.Context, id string) (store.Key, error) {
	var row keyRow
	if err := s.r.WithContext(ctx).Where("id = ?", id).Take(&row).Error; err != nil {
		return store.Key{}, mapErr("get key "+id, err)
	}
	k, err := s.keyFromRow(&row)
	if err != nil {
		return store.Key{}, fmt.Errorf("sqlstore: get key: %w", err)
	}
	ks := []store.Key{k}
	if err := s.fillFeatures(ctx, ks); err != nil {
		return store.Key{}, fmt.Errorf("sqlstore: get key: %w", err)
	}
	return ks[0], nil
}

// UpdateKey replaces every field of key k.ID except CreatedAt and Origin.
// An empty Secret keeps the stored value; a new Secret or Service re-seals
// it.
func (s *Store) UpdateKey(ctx context.Context, k *store.Key) error {
	if k.Service == "" {
		return fmt.Errorf("sqlstore: update key %s: %w: service is required", k.ID, store.ErrInvalid)
	}
	row, err := s.keyToRow(k)
	if err != nil {
		return fmt.Errorf("sqlstore: update key %s: %w", k.ID, err)
	}
	if s.keyring == nil || s.fpKey == nil {
		return fmt.Errorf("sqlstore: update key %s: %w", k.ID, ErrNoKeyring)
	}
	now := s.now()
	err = s.write(ctx, "update key "+k.ID, true, func(tx *gorm.DB) error {
		var old keyRow
		if err := tx.Select("id", "service", "ciphertext", "key_version", "fingerprint", "hint").
			Where("id = ?", k.ID).Take(&old).Error; err != nil {
			return err
		}
		if err := checkTiers(tx, []string{row.Tier}); err != nil {
			return err
		}
		row.Ciphertext, row.KeyVersion, row.Fingerprint, row.Hint = old.Ciphertext, old.KeyVersion, old.Fingerprint, old.Hint
		switch {
		case !k.Secret.IsZero():
			if err := s.sealKey(&row, k.Secret); err != nil {
				return err
			}
		case old.Service != row.Service:
			pt, err := s.keyring.Open(old.Ciphertext, keyAD(old.ID, old.Service))
			if err != nil {
				return fmt.Errorf("key %s: %w", old.ID, err)
			}
			if err := s.sealKey(&row, keypool.Secret(pt)); err != nil {
				return err
			}
		}
		return affected(tx.Model(&keyRow{}).Where("id = ?", k.ID).Updates(map[string]any{
			"service": row.Service, "ciphertext": row.Ciphertext, "key_version": row.KeyVersion,
			"fingerprint": row.Fingerprint, "hint": row.Hint, "weight": row.Weight, "priority": row.Priority,
			"rate_limit_rpm": row.RateLimitRPM, "max_in_flight": row.MaxInFlight, "labels": row.Labels,
			"balance_total": row.BalanceTotal, "balance_used": row.BalanceUsed, "balance_unit": row.BalanceUnit,
			"account_email": row.AccountEmail, "tier": row.Tier, "status": row.Status, "status_reason": row.StatusReason,
			"updated_at": now,
		}))
	})
	if err != nil {
		return err
	}
	k.Hint, k.Status, k.UpdatedAt = row.Hint, row.Status, now
	return nil
}

// SetKeyStatus changes only a key's status and reason.
func (s *Store) SetKeyStatus(ctx context.Context, id, status, reason string) error {
	if err := validStatus(status); err != nil {
		return fmt.Errorf("sqlstore: set key status %s: %w", id, err)
	}
	now := s.now()
	return s.write(ctx, "set key status "+id, true, func(tx *gorm.DB) error {
		return affected(tx.Model(&keyRow{}).Where("id = ?", id).Updates(map[string]any{
			"status": status, "status_reason": reason, "updated_at": now,
		}))
	})
}

// AddKeySpend adds amount to a key's BalanceUsed. It does not change
// [Store.Version]: spend is live state the pool tracks itself, and metering
// every request must not force reloads.
func (s *Store) AddKeySpend(ctx context.Context, id string, amount float64) error {
	return s.write(ctx, "add key spend "+id, false, func(tx *gorm.DB) error {
		return affected(tx.Model(&keyRow{}).Where("id = ?", id).
			UpdateColumn("balance_used", gorm.Expr("balance_used + ?", amount)))
	})
}

// DeleteKey deletes one key.
func (s *Store) DeleteKey(ctx context.Context, id string) error {
	return s.write(ctx, "delete key "+id, true, func(tx *gorm.DB) error {
		return affected(tx.Where("id = ?", id).Delete(&keyRow{}))
	})
}

// rewrapBatch is how many keys Rewrap re-seals per transaction.
const rewrapBatch = 500

// Rewrap re-seals every key value (and the fingerprint key) that is not
// sealed with the keyring's current key, in short batches, while the store
// keeps serving. Run it after putting a new key first in the keyring; once
// it returns, older keys can be dropped. It returns how many values it
// re-sealed. A row changed concurrently is skipped: the writer sealed it
// with the current key already. Rewrap does not change [Store.Version].
func (s *Store) Rewrap(ctx context.Context) (int, error) {
	if s.keyring == nil || s.fpKey == nil {
		return 0, fmt.Errorf("sqlstore: rewrap: %w", ErrNoKeyring)
	}
	cur := int64(s.keyring.Current())
	total := 0

	// The fingerprint key first.
	var fk [][]byte
	if err := s.r.WithContext(ctx).Raw("SELECT value FROM meta WHERE name = ?", metaFingerprintKey).Scan(&fk).Error; err != nil {
		return 0, mapErr("rewrap", err)
	}
	if len(fk) == 1 {
		if v, err := seal.VersionOf(fk[0]); err == nil && int64(v) != cur {
			nv, err := s.keyring.Seal(s.fpKey, fingerprintKeyAD)
			if err != nil {
				return 0, fmt.Errorf("sqlstore: rewrap: %w", err)
			}
			if err := s.write(ctx, "rewrap", false, func(tx *gorm.DB) error {
				return tx.Exec("UPDATE meta SET value = ? WHERE name = ? AND value = ?", nv, metaFingerprintKey, fk[0]).Error
			}); err != nil {
				return 0, err
			}
			total++
		}
	}

	after := ""
	for {
		var rows []keyRow
		err := s.r.WithContext(ctx).Select("id", "service", "ciphertext").
			Where("key_version <> ? AND id > ?", cur, after).Order("id").Limit(rewrapBatch).Find(&rows).Error
		if err != nil {
			return total, mapErr("rewrap", err)
		}
		if len(rows) == 0 {
			break
		}
		after = rows[len(rows)-1].ID
		sealed := make([][]byte, len(rows))
		for i := range rows {
			ad := keyAD(rows[i].ID, rows[i].Service)
			pt, err := s.keyring.Open(rows[i].Ciphertext, ad)
			if err != nil {
				return total, fmt.Errorf("sqlstore: rewrap key %s: %w", rows[i].ID, err)
			}
			if sealed[i], err = s.keyring.Seal(pt, ad); err != nil {
				return total, fmt.Errorf("sqlstore: rewrap key %s: %w", rows[i].ID, err)
			}
			clear(pt)
		}
		n := 0
		if err := s.write(ctx, "rewrap", false, func(tx *gorm.DB) error {
			n = 0
			for i := range rows {
				res := tx.Exec("UPDATE keys SET ciphertext = ?, key_version = ? WHERE id = ? AND ciphertext = ?",
					sealed[i], cur, rows[i].ID, rows[i].Ciphertext)
				if res.Error != nil {
					return res.Error
				}
				n += int(res.RowsAffected)
			}
			return nil
		}); err != nil {
			return total, err
		}
		total += n
	}
	if total > 0 {
		s.log.InfoContext(ctx, "sqlstore: re-sealed secrets with the current encryption key", "count", total, "key_version", s.keyring.Current().String())
	}
	return total, nil
}
