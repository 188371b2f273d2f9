"""The site console's Flask application: login, four pages, and the approve/deny action.

Security (each point is attacked by ``tests/test_site_console.py``):

- every page needs a login: the operator's token printed at start, the operator's password
  (``fedhealth site console PROFILE --set-password``), or the viewers' read-only token;
- approving and declining are POST forms with a CSRF token (Flask-WTF), allowed to the
  operator role only; the session cookie is HttpOnly and SameSite=Strict and signed with a
  key that lives only as long as the process;
- pages carry a Content-Security-Policy that allows only the console's own assets, and are
  not cached; no page shows a record of a dataset.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

from flask import Flask, abort, flash, redirect, render_template, request, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect

from fedhealth.config.site import SiteProfile, load_site
from fedhealth.errors import FedHealthError
from fedhealth.site.approvals import decide, list_studies
from fedhealth.site.console import views
from fedhealth.site.console.auth import Secrets
from fedhealth.site.console.chart import spend_chart

#: Failed logins allowed per minute before the login form refuses for the rest of it.
MAX_FAILURES = 10

_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Throttle:
    """Counts failed logins per minute (a guessed password stays slow to find)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.window = 0
        self.failures = 0

    def blocked(self) -> bool:
        with self.lock:
            now = int(time.time() // 60)
            if now != self.window:
                self.window, self.failures = now, 0
            return self.failures >= MAX_FAILURES

    def fail(self) -> None:
        with self.lock:
            self.failures += 1


def create_app(profile_path: Path, keys: Secrets) -> Flask:
    """The console of the site whose profile is ``profile_path``.

    Parameters
    ----------
    profile_path : Path
        The site profile; re-read on every request, so the pages follow its edits.
    keys : Secrets
        Who may log in, and with which role.

    Returns
    -------
    Flask
    """
    profile_path = Path(profile_path)
    load_site(profile_path)  # a broken profile fails at start, not at the first page
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_NAME="fedhealth_console",
        WTF_CSRF_TIME_LIMIT=None,  # bound to the session, which ends with the process
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    CSRFProtect(app)
    app.jinja_env.filters["num"] = views.number
    throttle = _Throttle()

    def site() -> SiteProfile:
        return load_site(profile_path)

    def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if session.get("role") not in ("operator", "viewer"):
                if request.method == "GET":
                    return redirect(url_for("login"))
                abort(401)
            return view(*args, **kwargs)

        return wrapped

    @app.after_request
    def headers(response):
        response.headers.update(_HEADERS)
        return response

    @app.context_processor
    def common() -> dict[str, Any]:
        profile = site()
        return {
            "site_name": profile.site.display_name or profile.name,
            "site_id": profile.name,
            "role": session.get("role"),
        }

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        return render_template("error.html", code=400, message=(
            f"Refused: {exc.description} Reload the page and submit the form again."
        )), 400  # fmt: skip

    @app.errorhandler(401)
    def unauthorised(exc):
        return render_template("error.html", code=401, message="Log in first."), 401

    @app.errorhandler(403)
    def forbidden(exc):
        return render_template("error.html", code=403, message=(
            "Refused: you are logged in read-only; only the site operator can approve or "
            "decline a study."
        )), 403  # fmt: skip

    @app.route("/login", methods=["GET", "POST"])
    def login():
        error = ""
        if request.method == "POST":
            if throttle.blocked():
                error = "Too many failed logins this minute; wait and try again."
            else:
                role = keys.role_of(request.form.get("secret", ""))
                if role is None:
                    throttle.fail()
                    error = "That is not this console's token or password."
                else:
                    session.clear()
                    session["role"] = role
                    return redirect(url_for("overview"))
        code = 401 if error else 200
        return render_template("login.html", error=error, password=bool(keys.password_hash)), code

    @app.post("/logout")
    def logout():
        session.clear()
        return redirect(url_for("login"))

    @app.get("/")
    @login_required
    def overview():
        profile = site()
        return render_template(
            "overview.html",
            policy=views.policy_sentences(profile),
            datasets=views.datasets(profile),
            connection=views.connection(profile, profile_path),
            workspace=str(profile.workspace),
            pending=sum(s["status"] in ("pending", "unknown") for s in list_studies(profile)),
        )

    @app.get("/studies")
    @login_required
    def studies():
        profile = site()
        pending, decided = views.studies(profile)
        return render_template(
            "studies.html",
            pending=pending,
            decided=decided,
            approval=profile.privacy.approval,
            default_by=views.env_user(),
        )

    @app.post("/studies/<study>/decide")
    @login_required
    def decide_study(study: str):
        if session.get("role") != "operator":
            abort(403)
        profile = site()
        verdict = request.form.get("verdict", "")
        by = request.form.get("by", "").strip()
        known = {s["study"] for s in list_studies(profile)}
        if study not in known:
            abort(404)
        if verdict not in ("approved", "declined") or not by:
            flash("Choose approve or deny, and say who decides.", "error")
            return redirect(url_for("studies"))
        try:
            d = decide(profile, study, cast(Literal["approved", "declined"], verdict), by=by)
        except FedHealthError as exc:
            flash(str(exc), "error")
        else:
            flash(
                f"Study {d.study[:16]}… {d.decision} by {d.by} at {d.at}: signed with the "
                "site's key and written to the audit log.",
                "ok",
            )
        return redirect(url_for("studies"))

    @app.get("/privacy")
    @login_required
    def privacy():
        profile = site()
        data = views.privacy(profile)
        p = profile.privacy
        charts = [
            (ds, spend_chart(ds, points, p.lifetime_epsilon_budget, p.max_epsilon_per_experiment))
            for ds, points in sorted(data["series"].items())
        ]
        return render_template("privacy.html", data=data, charts=charts, when=views.when,
                               policy=p)  # fmt: skip

    @app.get("/audit")
    @login_required
    def audit():
        profile = site()
        ledger = views.privacy(profile)
        return render_template("audit.html", data=views.audit(profile, ledger["entries"]))

    return app
