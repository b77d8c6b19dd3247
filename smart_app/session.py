"""A dashboard request's launch: checked against the browser's handle, with a fresh access token on demand.

Context is per launch, not per cookie (checklist T10): the launch id travels in every dashboard URL
and must belong to the browser's session handle, so two tabs with two patients each keep their own.
Access tokens are refreshed under a lock (a per-launch thread lock plus the database row lock), so a
rotated refresh token is never sent twice; when refreshing fails the launch is marked
``needs-relaunch`` and the page says so.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta

from auth import smart_launch as sl
from fhir_bridge import services
from fhir_bridge.errors import BridgeError, NotFound
from fhir_bridge.storage.models import SmartLaunch, Tenant, utcnow
from smart_app import web
from smart_app.state import state

log = logging.getLogger(__name__)

REFRESH_MARGIN = timedelta(seconds=30)
EXPIRED = "The EHR session for this dashboard has expired. Open the app again from the patient's chart."


class SessionExpired(BridgeError):
    status, code = 401, "session-expired"


@dataclass(frozen=True)
class LaunchContext:
    """What a dashboard request may touch: one tenant, one patient, the clinician who launched."""

    launch_id: str
    tenant_id: str
    tenant_name: str
    fhir_base: str
    patient_id: str
    encounter_id: str | None
    fhir_user: str | None
    user_key: str | None
    scope: str
    need_patient_banner: bool
    frame_ancestors: tuple[str, ...]

    @property
    def actor(self) -> str:
        """How audit rows name the clinician: their FHIR user, else the token's subject key."""
        return self.fhir_user or self.user_key or f"launch:{self.launch_id[:8]}"


_NOT_YOURS = (
    "This dashboard is not open in this browser session (it may have expired, or belong to another "
    "sign-in). Open the app again from the patient's chart in the EHR."
)


def load(launch_id: str) -> LaunchContext:
    """The launch named in the URL, if and only if this browser started it (L13, T10)."""
    svc = services.current()
    handle = web.browser_handle(state().cookies)
    if handle is None or len(launch_id) > 64:
        raise NotFound(_NOT_YOURS, code="launch-not-found")
    with svc.db.transaction() as session:
        launch = session.get(SmartLaunch, launch_id)
        if launch is None or not secrets.compare_digest(launch.browser_hash, web.handle_hash(handle)):
            raise NotFound(_NOT_YOURS, code="launch-not-found")
        tenant = session.get(Tenant, launch.tenant_id)
        if tenant is None or tenant.status != "active":
            raise NotFound(_NOT_YOURS, code="launch-not-found")
        web.allow_framing_by(list(tenant.frame_ancestors or []))
        now = utcnow()
        if launch.status == "ended" or launch.expires_at < now:
            raise SessionExpired(
                "This session has ended. Open the app again from the patient's chart.", code="session-expired"
            )
        launch.last_used_at = now
        base = sl.normalize_base_url(
            tenant.fhir_base_url, allow_insecure_loopback=svc.settings.allow_insecure_loopback
        )
        return LaunchContext(
            launch_id=launch.id,
            tenant_id=tenant.id,
            tenant_name=tenant.name,
            fhir_base=base,
            patient_id=launch.patient_id,
            encounter_id=launch.encounter_id,
            fhir_user=launch.fhir_user,
            user_key=launch.user_key,
            scope=launch.scope,
            need_patient_banner=launch.need_patient_banner,
            frame_ancestors=tuple(tenant.frame_ancestors or ()),
        )


def access_token(ctx: LaunchContext, *, force_refresh: bool = False) -> str:
    """The launch's access token, refreshed first if it is (about to be) expired or ``force_refresh``.

    :raises SessionExpired: the token cannot be renewed; the clinician must launch again (F9, R7).
    """
    svc = services.current()
    st = state()
    failure: sl.TokenError | None = None
    with st.launch_lock(ctx.launch_id), svc.db.transaction() as session:
        launch = session.get(SmartLaunch, ctx.launch_id, with_for_update=True)
        if launch is None or launch.status != "active":
            raise SessionExpired(EXPIRED)
        fresh = launch.access_expires_at - REFRESH_MARGIN > utcnow()
        if fresh and not force_refresh:
            return svc.cipher.decrypt(launch.access_token_enc).decode()
        tenant = session.get(Tenant, launch.tenant_id)
        if launch.refresh_token_enc is None or tenant is None:
            launch.status = "needs-relaunch"
        else:
            from smart_app.launch import client_assertion

            try:
                grant = sl.refresh_tokens(
                    st.http,
                    launch.token_url,
                    refresh_token=svc.cipher.decrypt(launch.refresh_token_enc).decode(),
                    client_id=str(tenant.smart_client_id),
                    client_assertion=client_assertion(tenant, launch.token_url),
                    granted_scope=launch.scope,
                    timeout=svc.settings.http_timeout_seconds,
                )
            except sl.TokenError as exc:
                failure = exc
                launch.status = "needs-relaunch"
                # Never try this refresh token again: it may be spent or revoked (checklist R7, R10).
                launch.refresh_token_enc = None
            else:
                launch.access_token_enc = svc.cipher.encrypt(grant.access_token.encode())
                if grant.refresh_token:  # a rotated refresh token replaces the old one (A42)
                    launch.refresh_token_enc = svc.cipher.encrypt(grant.refresh_token.encode())
                launch.access_expires_at = utcnow() + timedelta(seconds=grant.expires_in)
                launch.token_version += 1
                if grant.patient is not None and grant.patient != launch.patient_id:
                    # A refresh must not move the session to another patient.
                    launch.status = "needs-relaunch"
                else:
                    log.info("access token refreshed", extra={"tenant": tenant.id})
                    return grant.access_token
    if failure is not None:
        log.warning("refresh failed", extra={"tenant": ctx.tenant_id, "error_code": failure.code})
    raise SessionExpired(EXPIRED)


def invalidate(ctx: LaunchContext) -> None:
    """Forget the access token (the EHR said 401), so the next call refreshes it once."""
    svc = services.current()
    with svc.db.transaction() as session:
        launch = session.get(SmartLaunch, ctx.launch_id)
        if launch is not None:
            launch.access_expires_at = utcnow() - timedelta(seconds=1)
