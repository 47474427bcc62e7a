package admin

import (
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/keypool/keypool/auth"
	"github.com/keypool/keypool/internal/httpx"
	"github.com/keypool/keypool/store"
)

// teamInput is the body of POST and PATCH /admin/teams.
type teamInput struct {
	Name            opt[string]   `json:"name"`
	Description     opt[string]   `json:"description"`
	AllowedServices opt[[]string] `json:"allowed_services"`
	limitsInput
}

func (in *teamInput) apply(t *store.Team) error {
	if in.Name.Set {
		v := strings.TrimSpace(in.Name.V)
		if err := checkText("name", v, 128, true); err != nil {
			return err
		}
		t.Name = v
	}
	if err := setDescription(in.Description, &t.Description); err != nil {
		return err
	}
	if in.AllowedServices.Set {
		l, err := cleanList("allowed_services", in.AllowedServices.V, 64, 1000)
		if err != nil {
			return err
		}
		for _, s := range l {
			if !store.ValidName(s) {
				return badRequest("allowed_services: %q is not a valid service name", s)
			}
		}
		t.AllowedServices = l
	}
	return in.limitsInput.apply(&t.Limits)
}

func (a *API) createTeam(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	var in teamInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	if !in.Name.has() {
		return badRequest("name is required")
	}
	var t store.Team
	if err := in.apply(&t); err != nil {
		return err
	}
	if err := a.st.CreateTeam(r.Context(), &t); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return conflict("team %q already exists", t.Name)
		}
		return err
	}
	a.log.InfoContext(r.Context(), "admin: team created", "team_id", t.ID, "team", t.Name)
	httpx.WriteJSON(w, http.StatusCreated, t)
	return nil
}

func (a *API) listTeams(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	ts, err := a.st.ListTeams(r.Context())
	if err != nil {
		return err
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"teams": ts})
	return nil
}

func (a *API) getTeam(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	t, err := a.st.GetTeam(r.Context(), id)
	if err != nil {
		return orNotFound(err, "team %q not found", id)
	}
	httpx.WriteJSON(w, http.StatusOK, t)
	return nil
}

func (a *API) patchTeam(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	var in teamInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	t, err := a.st.GetTeam(r.Context(), id)
	if err != nil {
		return orNotFound(err, "team %q not found", id)
	}
	if in.Name.Null {
		return badRequest("name cannot be removed")
	}
	if err := in.apply(&t); err != nil {
		return err
	}
	if err := a.st.UpdateTeam(r.Context(), &t); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return conflict("team %q already exists", t.Name)
		}
		return orNotFound(err, "team %q not found", id)
	}
	a.auth.InvalidateTeam(t.ID)
	a.log.InfoContext(r.Context(), "admin: team updated", "team_id", t.ID, "team", t.Name)
	httpx.WriteJSON(w, http.StatusOK, t)
	return nil
}

func (a *API) deleteTeam(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	if err := a.st.DeleteTeam(r.Context(), id); err != nil {
		return orNotFound(err, "team %q not found", id)
	}
	a.auth.InvalidateTeam(id)
	a.log.InfoContext(r.Context(), "admin: team deleted", "team_id", id)
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// userInput is the body of POST and PATCH /admin/users.
type userInput struct {
	ExternalID opt[string] `json:"external_id"`
	TeamID     opt[string] `json:"team_id"`
	// Disabled stops the user from getting new tokens by single sign-on.
	Disabled opt[bool] `json:"disabled"`
}

func (a *API) applyUser(r *http.Request, in *userInput, u *store.User) error {
	if in.ExternalID.Set {
		v := strings.TrimSpace(in.ExternalID.V)
		if err := checkText("external_id", v, 320, true); err != nil {
			return err
		}
		u.ExternalID = v
	}
	if in.TeamID.Set {
		v := strings.TrimSpace(in.TeamID.V)
		if v == "" {
			return badRequest("team_id is required and must not be empty")
		}
		if _, err := a.st.GetTeam(r.Context(), v); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return badRequest("team_id: team %q does not exist", v)
			}
			return err
		}
		u.TeamID = v
	}
	if in.Disabled.Set {
		u.Disabled = in.Disabled.V
	}
	return nil
}

func (a *API) createUser(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	var in userInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	switch {
	case !in.ExternalID.has():
		return badRequest("external_id is required")
	case !in.TeamID.has():
		return badRequest("team_id is required")
	}
	var u store.User
	if err := a.applyUser(r, &in, &u); err != nil {
		return err
	}
	if err := a.st.CreateUser(r.Context(), &u); err != nil {
		switch {
		case errors.Is(err, store.ErrConflict):
			return conflict("a user with external_id %q already exists", u.ExternalID)
		case errors.Is(err, store.ErrInvalid):
			return badRequest("team_id: team %q does not exist", u.TeamID)
		}
		return err
	}
	a.log.InfoContext(r.Context(), "admin: user created", "user_id", u.ID, "team_id", u.TeamID)
	httpx.WriteJSON(w, http.StatusCreated, u)
	return nil
}

func (a *API) listUsers(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r, "team_id"); err != nil {
		return err
	}
	team := r.URL.Query().Get("team_id")
	if team != "" {
		if _, err := a.st.GetTeam(r.Context(), team); err != nil {
			return orNotFound(err, "team %q not found", team)
		}
	}
	us, err := a.st.ListUsers(r.Context(), team)
	if err != nil {
		return err
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"users": us})
	return nil
}

func (a *API) getUser(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	u, err := a.st.GetUser(r.Context(), id)
	if err != nil {
		return orNotFound(err, "user %q not found", id)
	}
	httpx.WriteJSON(w, http.StatusOK, u)
	return nil
}

func (a *API) patchUser(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	var in userInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	u, err := a.st.GetUser(r.Context(), id)
	if err != nil {
		return orNotFound(err, "user %q not found", id)
	}
	if err := a.applyUser(r, &in, &u); err != nil {
		return err
	}
	if err := a.st.UpdateUser(r.Context(), &u); err != nil {
		switch {
		case errors.Is(err, store.ErrConflict):
			return conflict("a user with external_id %q already exists", u.ExternalID)
		case errors.Is(err, store.ErrInvalid):
			return badRequest("team_id: team %q does not exist", u.TeamID)
		}
		return orNotFound(err, "user %q not found", id)
	}
	a.auth.InvalidateUser(u.ID)
	a.log.InfoContext(r.Context(), "admin: user updated", "user_id", u.ID, "team_id", u.TeamID)
	httpx.WriteJSON(w, http.StatusOK, u)
	return nil
}

func (a *API) deleteUser(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	if err := a.st.DeleteUser(r.Context(), id); err != nil {
		return orNotFound(err, "user %q not found", id)
	}
	a.auth.InvalidateUser(id)
	a.log.InfoContext(r.Context(), "admin: user deleted", "user_id", id)
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// tokenInput is the body of POST and PATCH /admin/tokens.
type tokenInput struct {
	Name        opt[string]    `json:"name"`
	Description opt[string]    `json:"description"`
	TeamID      opt[string]    `json:"team_id"`
	UserID      opt[string]    `json:"user_id"`
	Scopes      opt[[]string]  `json:"scopes"`
	ExpiresAt   opt[time.Time] `json:"expires_at"`
	IsActive    opt[bool]      `json:"is_active"`
	limitsInput
}

// Scopes a token may carry.
var knownScopes = map[string]bool{auth.ScopeLease: true}

func (in *tokenInput) apply(t *store.Token, now time.Time) error {
	if in.Name.Set {
		v := strings.TrimSpace(in.Name.V)
		if err := checkText("name", v, 128, false); err != nil {
			return err
		}
		t.Name = v
	}
	if err := setDescription(in.Description, &t.Description); err != nil {
		return err
	}
	if in.Scopes.Set {
		l, err := cleanList("scopes", in.Scopes.V, 64, 32)
		if err != nil {
			return err
		}
		for _, s := range l {
			if !knownScopes[s] {
				return badRequest("scopes: unknown scope %q (want %q)", s, auth.ScopeLease)
			}
		}
		t.Scopes = l
	}
	if in.ExpiresAt.Set {
		if in.ExpiresAt.Null {
			t.ExpiresAt = nil
		} else {
			if !in.ExpiresAt.V.After(now) {
				return badRequest("expires_at must be in the future")
			}
			e := in.ExpiresAt.V.UTC()
			t.ExpiresAt = &e
		}
	}
	if in.IsActive.has() {
		t.IsActive = in.IsActive.V
	}
	return in.limitsInput.apply(&t.Limits)
}

// tokenView is a token's metadata; it has no field for the token or its
// hash.
type tokenView struct {
	ID          string     `json:"id"`
	Name        string     `json:"name"`
	Description string     `json:"description"`
	Prefix      string     `json:"prefix"`
	TeamID      string     `json:"team_id"`
	UserID      *string    `json:"user_id"`
	Scopes      []string   `json:"scopes"`
	ExpiresAt   *time.Time `json:"expires_at"`
	IsActive    bool       `json:"is_active"`
	LastUsedAt  *time.Time `json:"last_used_at,omitempty"`
	store.Limits
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

func viewToken(t *store.Token) tokenView {
	v := tokenView{
		ID: t.ID, Name: t.Name, Description: t.Description, Prefix: t.Prefix, TeamID: t.TeamID, Scopes: t.Scopes,
		ExpiresAt: t.ExpiresAt, IsActive: t.IsActive, LastUsedAt: t.LastUsedAt, Limits: t.Limits,
		CreatedAt: t.CreatedAt, UpdatedAt: t.UpdatedAt,
	}
	if t.UserID != "" {
		u := t.UserID
		v.UserID = &u
	}
	if v.Scopes == nil {
		v.Scopes = []string{}
	}
	return v
}

// newTokenView is the answer to POST /admin/tokens: the only response
// that carries the token.
type newTokenView struct {
	tokenView
	Token string `json:"token"`
}

func (a *API) createToken(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r); err != nil {
		return err
	}
	var in tokenInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	t := store.Token{IsActive: true}
	teamID, userID := strings.TrimSpace(in.TeamID.V), strings.TrimSpace(in.UserID.V)
	switch {
	case teamID == "" && userID == "":
		return badRequest("team_id or user_id is required")
	case userID != "":
		u, err := a.st.GetUser(r.Context(), userID)
		if err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return badRequest("user_id: user %q does not exist", userID)
			}
			return err
		}
		if teamID != "" && teamID != u.TeamID {
			return badRequest("team_id: user %q is in team %q, not %q", userID, u.TeamID, teamID)
		}
		t.UserID, t.TeamID = u.ID, u.TeamID
	default:
		if _, err := a.st.GetTeam(r.Context(), teamID); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return badRequest("team_id: team %q does not exist", teamID)
			}
			return err
		}
		t.TeamID = teamID
	}
	if err := in.apply(&t, a.now()); err != nil {
		return err
	}
	tok, prefix, hash, err := auth.NewToken()
	if err != nil {
		return err
	}
	t.Prefix, t.Hash = prefix, hash
	if err := a.st.CreateToken(r.Context(), &t); err != nil {
		if errors.Is(err, store.ErrInvalid) {
			return badRequest("team_id or user_id does not exist")
		}
		return err
	}
	a.log.InfoContext(r.Context(), "admin: token created", "token_id", t.ID, "prefix", t.Prefix, "team_id", t.TeamID)
	httpx.WriteJSON(w, http.StatusCreated, newTokenView{tokenView: viewToken(&t), Token: tok})
	return nil
}

func (a *API) listTokens(w http.ResponseWriter, r *http.Request) error {
	if err := checkQuery(r, "team_id"); err != nil {
		return err
	}
	team := r.URL.Query().Get("team_id")
	if team != "" {
		if _, err := a.st.GetTeam(r.Context(), team); err != nil {
			return orNotFound(err, "team %q not found", team)
		}
	}
	ts, err := a.st.ListTokens(r.Context(), team)
	if err != nil {
		return err
	}
	out := make([]tokenView, len(ts))
	for i := range ts {
		out[i] = viewToken(&ts[i])
	}
	httpx.WriteJSON(w, http.StatusOK, map[string]any{"tokens": out})
	return nil
}

func (a *API) getToken(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	t, err := a.st.GetToken(r.Context(), id)
	if err != nil {
		return orNotFound(err, "token %q not found", id)
	}
	httpx.WriteJSON(w, http.StatusOK, viewToken(&t))
	return nil
}

func (a *API) patchToken(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	var in tokenInput
	if err := decode(w, r, &in); err != nil {
		return err
	}
	t, err := a.st.GetToken(r.Context(), id)
	if err != nil {
		return orNotFound(err, "token %q not found", id)
	}
	switch {
	case in.TeamID.Set && strings.TrimSpace(in.TeamID.V) != t.TeamID,
		in.UserID.Set && strings.TrimSpace(in.UserID.V) != t.UserID:
		return badRequest("a token cannot move to another team or user; create a new token")
	case in.IsActive.Null:
		return badRequest("is_active must be true or false")
	}
	if err := in.apply(&t, a.now()); err != nil {
		return err
	}
	if err := a.st.UpdateToken(r.Context(), &t); err != nil {
		return orNotFound(err, "token %q not found", id)
	}
	a.auth.Invalidate(t.ID)
	a.log.InfoContext(r.Context(), "admin: token updated", "token_id", t.ID, "prefix", t.Prefix, "is_active", t.IsActive)
	httpx.WriteJSON(w, http.StatusOK, viewToken(&t))
	return nil
}

func (a *API) deleteToken(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	if err := a.st.DeleteToken(r.Context(), id); err != nil {
		return orNotFound(err, "token %q not found", id)
	}
	a.auth.Invalidate(id)
	a.log.InfoContext(r.Context(), "admin: token deleted", "token_id", id)
	w.WriteHeader(http.StatusNoContent)
	return nil
}
