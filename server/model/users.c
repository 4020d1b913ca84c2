/* users: create, rename, update and destroy tailnet users (writer side). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/writer_int.h"

/* ---- users ----------------------------------------------------------------------------------- */
static char *dup_opt(const char *s) { return s && *s ? tc_xstrdup(s) : NULL; }

static int check_profile(const char *display_name, const char *email, const char *pic,
                         struct tc_err *err) {
  const char *v[] = {display_name, email, pic};
  const char *what[] = {"display name", "email", "profile picture URL"};
  for (size_t i = 0; i < 3; i++) {
    if (!v[i]) continue;
    if (strnlen(v[i], MAX_PROFILE_FIELD + 1) > MAX_PROFILE_FIELD)
      return tc_err_set(err, TC_ETOOBIG, "%s longer than %d bytes", what[i], MAX_PROFILE_FIELD);
    for (const unsigned char *c = (const unsigned char *)v[i]; *c; c++)
      if (*c < 0x20 || *c == 0x7f) return tc_err_set(err, TC_EINVAL, "%s contains a control character", what[i]);
  }
  return 0;
}

int tc_model_user_create(struct tc_model *m, const char *actor, const char *name,
                         const char *display_name, const char *email, int64_t *id_out,
                         struct tc_err *err) {
  int rc = tc_model_validate_username(name, err);
  if (rc) return rc;
  if ((rc = check_profile(display_name, email, NULL, err))) return rc;
  struct wr w;
  struct plan p;
  pthread_mutex_lock(&m->wmu);
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, "user.create", "user", 0);
  if (tc_snapshot_user_by_name(w.base, name)) {
    rc = tc_err_set(err, TC_EEXIST, "user \"%s\" already exists", name);
    goto out;
  }
  struct tc_user *u = tc_box_user(&zero_user);
  u->name = tc_xstrdup(name);
  u->display_name = dup_opt(display_name);
  u->email = dup_opt(email);
  tcm_plan_add(&p, OP_USER_INSERT, u, 0, 0);
  p.target_op = 0;
  p.detail = tc_xasprintf("name=%s", name);
  if ((rc = tcm_plan_run(m, &p, err))) {
    tc_box_unref(u);
    goto out;
  }
  if (id_out) *id_out = u->id;
  w.u = tc_utab_edit(w.base->priv->users, u, 0);
  tcm_wr_event(&w, TC_CHANGE_USER_ADDED)->user_id = u->id;
  tcm_wr_publish(&w);
out:
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
}

/* Common tail of user updates: u is a boxed modified copy (stolen). */
static int user_commit(struct wr *w, struct plan *p, struct tc_user *u, struct tc_err *err) {
  tcm_plan_add(p, OP_USER_UPDATE, u, 0, 0);
  int rc = tcm_plan_run(w->m, p, err);
  if (rc) {
    tc_box_unref(u);
    return rc;
  }
  w->u = tc_utab_edit(w->base->priv->users, u, 0);
  tcm_wr_event(w, TC_CHANGE_USER_CHANGED)->user_id = u->id;
  tcm_wr_publish(w);
  return 0;
}

int tc_model_user_rename(struct tc_model *m, const char *actor, int64_t id, const char *new_name,
                         struct tc_err *err) {
  int rc = tc_model_validate_username(new_name, err);
  if (rc) return rc;
  struct wr w;
  struct plan p;
  pthread_mutex_lock(&m->wmu);
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, "user.rename", "user", id);
  const struct tc_user *old = tc_snapshot_user(w.base, id);
  const struct tc_user *other = tc_snapshot_user_by_name(w.base, new_name);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "user %lld not found", (long long)id);
  } else if (other && other->id != id) {
    rc = tc_err_set(err, TC_EEXIST, "user \"%s\" already exists", new_name);
  } else {
    struct tc_user *u = tc_box_user(old);
    p.detail = tc_xasprintf("from=%s to=%s", old->name, new_name);
    free(u->name);
    u->name = tc_xstrdup(new_name);
    rc = user_commit(&w, &p, u, err);
  }
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
}

int tc_model_user_update(struct tc_model *m, const char *actor, int64_t id,
                         const char *display_name, const char *email,
                         const char *profile_pic_url, struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc = check_profile(display_name, email, profile_pic_url, err);
  if (rc) return rc;
  pthread_mutex_lock(&m->wmu);
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, "user.update", "user", id);
  const struct tc_user *old = tc_snapshot_user(w.base, id);
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "user %lld not found", (long long)id);
  } else {
    struct tc_user *u = tc_box_user(old);
    if (display_name) {
      free(u->display_name);
      u->display_name = dup_opt(display_name);
    }
    if (email) {
      free(u->email);
      u->email = dup_opt(email);
    }
    if (profile_pic_url) {
      free(u->profile_pic_url);
      u->profile_pic_url = dup_opt(profile_pic_url);
    }
    rc = user_commit(&w, &p, u, err);
  }
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
}

int tc_model_user_destroy(struct tc_model *m, const char *actor, int64_t id, struct tc_err *err) {
  struct wr w;
  struct plan p;
  int rc;
  pthread_mutex_lock(&m->wmu);
  tcm_wr_init(&w, m);
  tcm_plan_init(&p, actor, "user.destroy", "user", id);
  const struct tc_user *old = tc_snapshot_user(w.base, id);
  size_t owned = old ? tc_snapshot_user_node_count(w.base, id) : 0;
  if (!old) {
    rc = tc_err_set(err, TC_ENOENT, "user %lld not found", (long long)id);
    goto out;
  }
  if (owned) {
    rc = tc_err_set(err, TC_ECONFLICT,
                    "user \"%s\" still owns %zu node%s; delete or move them first", old->name,
                    owned, owned == 1 ? "" : "s");
    goto out;
  }
  p.detail = tc_xasprintf("name=%s", old->name);
  const struct tc_ktab *kt = tcm_wr_keys(&w);
  for (size_t i = 0; i < kt->n_pre; i++)
    if (kt->pre[i]->user_id == id) tcm_plan_add(&p, OP_PRE_DELETE, NULL, kt->pre[i]->id, 0);
  size_t n_keys = p.n;
  tcm_plan_add(&p, OP_USER_DELETE, NULL, id, 0);
  if ((rc = tcm_plan_run(m, &p, err))) goto out;
  for (size_t i = 0; i < n_keys; i++) {
    tcm_wr_set_keys(&w, tc_ktab_edit_pre(tcm_wr_keys(&w), NULL, p.ops[i].id));
    /* Nodes that registered with a deleted key forget it (storage did too). */
  }
  if (n_keys) {
    const struct tc_ntab *nt = tcm_wr_nodes(&w);
    struct tc_node **nv = tc_xmalloc((nt->n + 1) * sizeof *nv);
    bool any = false;
    for (size_t i = 0; i < nt->n; i++) {
      bool hit = false;
      for (size_t j = 0; j < n_keys && nt->v[i]->auth_key_id; j++)
        if (nt->v[i]->auth_key_id == p.ops[j].id) hit = true;
      if (hit) {
        nv[i] = tc_box_node(nt->v[i]);
        nv[i]->auth_key_id = 0;
        any = true;
      } else {
        nv[i] = tc_box_ref(nt->v[i]);
      }
    }
    if (any) tcm_wr_set_nodes(&w, tc_ntab_new(nv, nt->n));
    else {
      for (size_t i = 0; i < nt->n; i++) tc_box_unref(nv[i]);
      free(nv);
    }
    tcm_wr_event(&w, TC_CHANGE_PREAUTH_KEY)->user_id = id;
  }
  w.u = tc_utab_edit(w.base->priv->users, NULL, id);
  tcm_wr_event(&w, TC_CHANGE_USER_REMOVED)->user_id = id;
  tcm_wr_publish(&w);
out:
  tcm_plan_free(&p);
  tcm_wr_done(&w);
  return tcm_unlock(m, rc, err);
}
