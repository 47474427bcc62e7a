package sso

import (
	"net/http"
	"time"

	"github.com/keypool/keypool/store"
)

// userSession is the self-service session of a signed-in user, in a
// MAC'd cookie: stateless, so every replica sharing the state secret
// accepts it. The user is read from the store on each request, so a
// deleted or disabled user is out at once.
type userSession struct {
	UserID  string `json:"u"`
	Expires int64  `json:"e"`
}

func (h *Handler) startUserSession(w http.ResponseWriter, r *http.Request, u store.User) {
	v, err := h.sig.sign("user", userSession{UserID: u.ID, Expires: h.now().Add(h.cfg.UserSessionTTL).Unix()})
	if err != nil {
		return
	}
	h.setCookie(w, r, UserCookie, v, "/auth/", h.cfg.UserSessionTTL)
}

// sessionUser returns the signed-in user of r, if any.
func (h *Handler) sessionUser(r *http.Request) (store.User, bool) {
	c, err := r.Cookie(UserCookie)
	var s userSession
	if err != nil || !h.sig.open("user", c.Value, &s) || !h.now().Before(time.Unix(s.Expires, 0)) {
		return store.User{}, false
	}
	u, err := h.cfg.Store.GetUser(r.Context(), s.UserID)
	if err != nil || u.Disabled {
		return store.User{}, false
	}
	return u, true
}

type tokenRow struct {
	store.Token
	Requests, Tokens int64
	Cost             float64
	Expired          bool
	// LastDay is the last day (UTC, 2006-01-02) with usage recorded for
	// the token, shown when the store keeps no LastUsedAt.
	LastDay string
}

type budgetRow struct {
	Name        string
	Used, Limit string
	Percent     int
	Over        bool
}

type mePage struct {
	Email, Team, BaseURL string
	Tokens               []tokenRow
	Budget               []budgetRow
	Requests, Used       int64
	Cost                 float64
}

// me is the self-service page: the user's own tokens and usage, and
// their team's use against its limits.
func (h *Handler) me(w http.ResponseWriter, r *http.Request) {
	u, ok := h.sessionUser(r)
	if !ok {
		http.Redirect(w, r, "/auth/login", http.StatusSeeOther)
		return
	}
	ctx := r.Context()
	team, err := h.cfg.Store.GetTeam(ctx, u.TeamID)
	if err != nil {
		h.fail(w, http.StatusInternalServerError, "Unavailable", "keypool could not read your team.")
		return
	}
	all, err := h.cfg.Store.ListTokens(ctx, u.TeamID)
	if err != nil {
		h.fail(w, http.StatusInternalServerError, "Unavailable", "keypool could not read your tokens.")
		return
	}
	rows, err := h.cfg.Store.QueryUsage(ctx, store.UsageQuery{Team: u.TeamID, GroupBy: []string{store.GroupToken, store.GroupDay}})
	if err != nil {
		h.fail(w, http.StatusInternalServerError, "Unavailable", "keypool could not read your usage.")
		return
	}
	byToken := map[string]store.UsageRow{}
	lastDay := map[string]string{}
	for _, row := range rows {
		id := row.Group[store.GroupToken]
		sum := byToken[id]
		sum.Requests += row.Requests
		sum.TokensIn += row.TokensIn
		sum.TokensOut += row.TokensOut
		sum.Cost += row.Cost
		byToken[id] = sum
		lastDay[id] = max(lastDay[id], row.Group[store.GroupDay])
	}
	now := h.now()
	p := mePage{Email: u.ExternalID, Team: team.Name, BaseURL: h.cfg.BaseURL}
	for _, t := range all {
		if t.UserID != u.ID {
			continue
		}
		use := byToken[t.ID]
		p.Tokens = append(p.Tokens, tokenRow{Token: t, Requests: use.Requests, Tokens: use.TokensIn + use.TokensOut, Cost: use.Cost,
			Expired: t.ExpiresAt != nil && !now.Before(*t.ExpiresAt), LastDay: lastDay[t.ID]})
		p.Requests += use.Requests
		p.Used += use.TokensIn + use.TokensOut
		p.Cost += use.Cost
	}
	if p.Budget, err = h.budget(r, team, now); err != nil {
		h.fail(w, http.StatusInternalServerError, "Unavailable", "keypool could not read your team's usage.")
		return
	}
	h.render(w, http.StatusOK, "me", p)
}

// budget compares the team's usage with its limits (those it has).
func (h *Handler) budget(r *http.Request, team store.Team, now time.Time) ([]budgetRow, error) {
	now = now.UTC()
	day := time.Date(now.Year(), now.Month(), now.Day(), 0, 0, 0, 0, time.UTC)
	month := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	sum := func(since time.Time) (tokens int64, cost float64, err error) {
		rows, err := h.cfg.Store.QueryUsage(r.Context(), store.UsageQuery{Team: team.ID, Since: since})
		for _, row := range rows {
			tokens += row.TokensIn + row.TokensOut
			cost += row.Cost
		}
		return tokens, cost, err
	}
	dTok, dCost, err := sum(day)
	if err != nil {
		return nil, err
	}
	mTok, mCost, err := sum(month)
	if err != nil {
		return nil, err
	}
	tTok, tCost, err := sum(time.Time{})
	if err != nil {
		return nil, err
	}
	var out []budgetRow
	addCost := func(name string, used, limit float64) {
		if limit > 0 {
			out = append(out, budgetRow{Name: name, Used: usd(used), Limit: usd(limit), Percent: percent(used, limit), Over: used >= limit})
		}
	}
	addTok := func(name string, used, limit int64) {
		if limit > 0 {
			out = append(out, budgetRow{Name: name, Used: itoa(used), Limit: itoa(limit), Percent: percent(float64(used), float64(limit)), Over: used >= limit})
		}
	}
	addTok("Tokens today", dTok, team.DailyTokenLimit)
	addTok("Tokens today (block)", dTok, team.LimitTokensDayBlock)
	addTok("Tokens this month", mTok, team.LimitTokensMonthBlock)
	addTok("Tokens in total", tTok, team.LimitTokensTotalBlock)
	addCost("Cost today", dCost, team.LimitCostDayBlock)
	addCost("Cost this month", mCost, team.LimitCostMonthBlock)
	addCost("Cost in total", tCost, team.LimitCostTotalBlock)
	if team.RPMLimit > 0 {
		out = append(out, budgetRow{Name: "Requests per minute", Used: "—", Limit: itoa(int64(team.RPMLimit))})
	}
	if team.TPMLimit > 0 {
		out = append(out, budgetRow{Name: "Tokens per minute", Used: "—", Limit: itoa(team.TPMLimit)})
	}
	return out, nil
}

// createToken makes another token for the signed-in user.
func (h *Handler) createToken(w http.ResponseWriter, r *http.Request) {
	u, ok := h.sessionUser(r)
	if !ok {
		h.fail(w, http.StatusUnauthorized, "Signed out", "Sign in again at /auth/login.")
		return
	}
	h.mintAndShow(w, r, u, u.ExternalID)
}

// revokeToken revokes one of the signed-in user's own tokens.
func (h *Handler) revokeToken(w http.ResponseWriter, r *http.Request) {
	u, ok := h.sessionUser(r)
	if !ok {
		h.fail(w, http.StatusUnauthorized, "Signed out", "Sign in again at /auth/login.")
		return
	}
	t, err := h.cfg.Store.GetToken(r.Context(), r.PathValue("id"))
	if err != nil || t.UserID != u.ID {
		h.fail(w, http.StatusNotFound, "No such token", "You have no token with that id.")
		return
	}
	t.IsActive = false
	if err := h.cfg.Store.UpdateToken(r.Context(), &t); err != nil {
		h.log.Error("sso: revoke token", "err", err)
		h.fail(w, http.StatusInternalServerError, "Not revoked", "keypool could not revoke the token. Try again.")
		return
	}
	if h.cfg.OnRevoke != nil {
		h.cfg.OnRevoke(t.ID)
	}
	h.audit(r, u.ExternalID, "sso.token_revoke", t.ID, http.StatusOK)
	http.Redirect(w, r, "/auth/me", http.StatusSeeOther)
}

// logout ends the self-service session (this browser's cookie).
func (h *Handler) logout(w http.ResponseWriter, r *http.Request) {
	h.clearCookie(w, r, UserCookie, "/auth/")
	h.render(w, http.StatusOK, "error", errorPage{Title: "Signed out", Message: "You are signed out. Your tokens keep working until you revoke them."})
}
