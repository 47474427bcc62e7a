package sqlstore

import (
	"context"
	"fmt"

	"gorm.io/gorm"

	"github.com/keypool/keypool/store"
)

// CreateTeam inserts a team with a new "team_…" id (unless t.ID is set);
// its name must be unique.
func (s *Store) CreateTeam(ctx context.Context, t *store.Team) error {
	if t.Name == "" {
		return fmt.Errorf("sqlstore: create team: %w: name is required", store.ErrInvalid)
	}
	row, err := teamToRow(t)
	if err != nil {
		return fmt.Errorf("sqlstore: create team: %w", err)
	}
	if row.ID == "" {
		row.ID = newID("team")
	}
	now := s.now()
	row.CreatedAt, row.UpdatedAt = now, now
	if err := s.write(ctx, "create team", false, func(tx *gorm.DB) error { return tx.Create(&row).Error }); err != nil {
		return err
	}
	t.ID, t.CreatedAt, t.UpdatedAt = row.ID, now, now
	return nil
}

// GetTeam returns one team.
func (s *Store) GetTeam(ctx context.Context, id string) (store.Team, error) {
	var row teamRow
	if err := s.r.WithContext(ctx).Where("id = ?", id).Take(&row).Error; err != nil {
		return store.Team{}, mapErr("get team "+id, err)
	}
	t, err := teamFromRow(&row)
	if err != nil {
		return store.Team{}, fmt.Errorf("sqlstore: get team: %w", err)
	}
	return t, nil
}

// ListTeams returns every team, ordered by name.
func (s *Store) ListTeams(ctx context.Context) ([]store.Team, error) {
	var rows []teamRow
	if err := s.r.WithContext(ctx).Order("name").Find(&rows).Error; err != nil {
		return nil, mapErr("list teams", err)
	}
	out := make([]store.Team, len(rows))
	for i := range rows {
		t, err := teamFromRow(&rows[i])
		if err != nil {
			return nil, fmt.Errorf("sqlstore: list teams: %w", err)
		}
		out[i] = t
	}
	return out, nil
}

// UpdateTeam replaces every field of team t.ID except CreatedAt.
func (s *Store) UpdateTeam(ctx context.Context, t *store.Team) error {
	if t.Name == "" {
		return fmt.Errorf("sqlstore: update team %s: %w: name is required", t.ID, store.ErrInvalid)
	}
	row, err := teamToRow(t)
	if err != nil {
		return fmt.Errorf("sqlstore: update team %s: %w", t.ID, err)
	}
	now := s.now()
	if err := s.write(ctx, "update team "+t.ID, false, func(tx *gorm.DB) error {
		return affected(tx.Model(&teamRow{}).Where("id = ?", t.ID).Updates(map[string]any{
			"name": row.Name, "description": row.Description, "allowed_services": row.AllowedServices, "limits": row.Limits, "updated_at": now,
		}))
	}); err != nil {
		return err
	}
	t.UpdatedAt = now
	return nil
}

// DeleteTeam deletes a team and, by cascade, its users and tokens.
func (s *Store) DeleteTeam(ctx context.Context, id string) error {
	return s.write(ctx, "delete team "+id, false, func(tx *gorm.DB) error {
		return affected(tx.Where("id = ?", id).Delete(&teamRow{}))
	})
}

// CreateUser inserts a user with a new "user_…" id (unless u.ID is set).
// ExternalID is unique; TeamID must name a team (else ErrInvalid).
func (s *Store) CreateUser(ctx context.Context, u *store.User) error {
	if u.ExternalID == "" || u.TeamID == "" {
		return fmt.Errorf("sqlstore: create user: %w: external_id and team_id are required", store.ErrInvalid)
	}
	now := s.now()
	row := userRow{ID: u.ID, ExternalID: u.ExternalID, TeamID: u.TeamID, Disabled: u.Disabled, CreatedAt: now, UpdatedAt: now}
	if row.ID == "" {
		row.ID = newID("user")
	}
	if err := s.write(ctx, "create user", false, func(tx *gorm.DB) error { return tx.Create(&row).Error }); err != nil {
		return err
	}
	u.ID, u.CreatedAt, u.UpdatedAt = row.ID, now, now
	return nil
}

// GetUser returns one user.
func (s *Store) GetUser(ctx context.Context, id string) (store.User, error) {
	var row userRow
	if err := s.r.WithContext(ctx).Where("id = ?", id).Take(&row).Error; err != nil {
		return store.User{}, mapErr("get user "+id, err)
	}
	return userFromRow(&row), nil
}

// ListUsers returns the users of a team, or every user when teamID is "",
// in creation order.
func (s *Store) ListUsers(ctx context.Context, teamID string) ([]store.User, error) {
	q := s.r.WithContext(ctx).Model(&userRow{})
	if teamID != "" {
		q = q.Where("team_id = ?", teamID)
	}
	var rows []userRow
	if err := q.Order("created_at, id").Find(&rows).Error; err != nil {
		return nil, mapErr("list users", err)
	}
	out := make([]store.User, len(rows))
	for i := range rows {
		out[i] = userFromRow(&rows[i])
	}
	return out, nil
}

// UpdateUser changes a user's ExternalID, TeamID and Disabled. Moving a user to
// another team moves its tokens with it.
func (s *Store) UpdateUser(ctx context.Context, u *store.User) error {
	if u.ExternalID == "" || u.TeamID == "" {
		return fmt.Errorf("sqlstore: update user %s: %w: external_id and team_id are required", u.ID, store.ErrInvalid)
	}
	now := s.now()
	if err := s.write(ctx, "update user "+u.ID, false, func(tx *gorm.DB) error {
		if err := affected(tx.Model(&userRow{}).Where("id = ?", u.ID).Updates(map[string]any{
			"external_id": u.ExternalID, "team_id": u.TeamID, "disabled": u.Disabled, "updated_at": now,
		})); err != nil {
			return err
		}
		return tx.Model(&tokenRow{}).Where("user_id = ? AND team_id <> ?", u.ID, u.TeamID).
			Updates(map[string]any{"team_id": u.TeamID, "updated_at": now}).Error
	}); err != nil {
		return err
	}
	u.UpdatedAt = now
	return nil
}

// DeleteUser deletes a user and, by cascade, its tokens.
func (s *Store) DeleteUser(ctx context.Context, id string) error {
	return s.write(ctx, "delete user "+id, false, func(tx *gorm.DB) error {
		return affected(tx.Where("id = ?", id).Delete(&userRow{}))
	})
}

// CreateToken inserts a token with a new "tok_…" id (unless t.ID is set).
// Hash is required and unique. A token of a user counts against the user's
// team: TeamID may be left empty and is filled in, and a TeamID that is
// not the user's is ErrInvalid.
func (s *Store) CreateToken(ctx context.Context, t *store.Token) error {
	if len(t.Hash) == 0 || (t.TeamID == "" && t.UserID == "") {
		return fmt.Errorf("sqlstore: create token: %w: hash and team_id or user_id are required", store.ErrInvalid)
	}
	row, err := tokenToRow(t)
	if err != nil {
		return fmt.Errorf("sqlstore: create token: %w", err)
	}
	if row.ID == "" {
		row.ID = newID("tok")
	}
	now := s.now()
	row.CreatedAt, row.UpdatedAt = now, now
	if err := s.write(ctx, "create token", false, func(tx *gorm.DB) error {
		if t.UserID != "" {
			var u userRow
			if err := tx.Select("id", "team_id").Where("id = ?", t.UserID).Take(&u).Error; err != nil {
				if err == gorm.ErrRecordNotFound {
					return fmt.Errorf("%w: user %s does not exist", store.ErrInvalid, t.UserID)
				}
				return err
			}
			if row.TeamID == "" {
				row.TeamID = u.TeamID
			} else if row.TeamID != u.TeamID {
				return fmt.Errorf("%w: user %s is not in team %s", store.ErrInvalid, t.UserID, row.TeamID)
			}
		}
		return tx.Create(&row).Error
	}); err != nil {
		return err
	}
	t.ID, t.TeamID, t.CreatedAt, t.UpdatedAt = row.ID, row.TeamID, now, now
	return nil
}

// GetToken returns one token.
func (s *Store) GetToken(ctx context.Context, id string) (store.Token, error) {
	return s.getToken(ctx, "id = ?", id)
}

// GetTokenByHash returns the token whose hash is hash.
func (s *Store) GetTokenByHash(ctx context.Context, hash []byte) (store.Token, error) {
	return s.getToken(ctx, "hash = ?", hash)
}

func (s *Store) getToken(ctx context.Context, where string, arg any) (store.Token, error) {
	var row tokenRow
	if err := s.r.WithContext(ctx).Where(where, arg).Take(&row).Error; err != nil {
		return store.Token{}, mapErr("get token", err)
	}
	t, err := tokenFromRow(&row)
	if err != nil {
		return store.Token{}, fmt.Errorf("sqlstore: get token: %w", err)
	}
	return t, nil
}

// ListTokens returns the tokens of a team, or every token when teamID is
// "", in creation order.
func (s *Store) ListTokens(ctx context.Context, teamID string) ([]store.Token, error) {
	q := s.r.WithContext(ctx).Model(&tokenRow{})
	if teamID != "" {
		q = q.Where("team_id = ?", teamID)
	}
	var rows []tokenRow
	if err := q.Order("created_at, id").Find(&rows).Error; err != nil {
		return nil, mapErr("list tokens", err)
	}
	out := make([]store.Token, len(rows))
	for i := range rows {
		t, err := tokenFromRow(&rows[i])
		if err != nil {
			return nil, fmt.Errorf("sqlstore: list tokens: %w", err)
		}
		out[i] = t
	}
	return out, nil
}

// UpdateToken changes a token's Name, Scopes, ExpiresAt, IsActive, Limits
// and LastUsedAt. Its Hash, Prefix, TeamID, UserID and CreatedAt never
// change.
func (s *Store) UpdateToken(ctx context.Context, t *store.Token) error {
	row, err := tokenToRow(t)
	if err != nil {
		return fmt.Errorf("sqlstore: update token %s: %w", t.ID, err)
	}
	now := s.now()
	if err := s.write(ctx, "update token "+t.ID, false, func(tx *gorm.DB) error {
		return affected(tx.Model(&tokenRow{}).Where("id = ?", t.ID).Updates(map[string]any{
			"name": row.Name, "description": row.Description, "scopes": row.Scopes, "expires_at": row.ExpiresAt, "is_active": row.IsActive,
			"limits": row.Limits, "last_used_at": row.LastUsedAt, "updated_at": now,
		}))
	}); err != nil {
		return err
	}
	t.UpdatedAt = now
	return nil
}

// DeleteToken deletes one token.
func (s *Store) DeleteToken(ctx context.Context, id string) error {
	return s.write(ctx, "delete token "+id, false, func(tx *gorm.DB) error {
		return affected(tx.Where("id = ?", id).Delete(&tokenRow{}))
	})
}
