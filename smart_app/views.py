"""Routes of the SMART app. Views are thin: each one calls a function of launch, dashboard or registration."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.wrappers import Response as BaseResponse

from fhir_bridge import services
from smart_app import dashboard, launch, prescribe, registration, relationship, web
from smart_app.dashboard import ReaderFactory
from smart_app.state import SmartState, install, state

bp = Blueprint(
    "smart_app",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/smart-static",
)

_READER_KEY = "smart_app.reader_factory"


def reader_factory() -> ReaderFactory:
    factory = current_app.extensions[_READER_KEY]
    return factory  # type: ignore[no-any-return]


@bp.get("/launch")
def ehr_launch() -> BaseResponse:
    return launch.ehr_launch()


@bp.get("/launch/standalone")
def standalone_launch() -> BaseResponse | str:
    return launch.standalone_launch()


@bp.get("/callback/<tenant_id>")
def callback(tenant_id: str) -> BaseResponse:
    return launch.callback(tenant_id)


@bp.get("/registration")
def registration_page() -> str:
    return registration.page()


@bp.get("/app/<launch_id>/")
def dashboard_page(launch_id: str) -> str:
    return dashboard.page(launch_id)


@bp.get("/app/<launch_id>/api/summary")
def dashboard_data(launch_id: str) -> Response:
    return dashboard.data(launch_id, reader_factory())


@bp.post("/app/<launch_id>/api/alerts/<alert_id>/acknowledge")
def acknowledge_alert(launch_id: str, alert_id: str) -> Response:
    return dashboard.acknowledge(launch_id, alert_id)


@bp.post("/app/<launch_id>/api/follow-up")
def follow_up(launch_id: str) -> Response:
    return dashboard.request_follow_up(launch_id)


@bp.get("/app/<launch_id>/api/relationship")
def relationship_state(launch_id: str) -> Response:
    return relationship.get(launch_id)


@bp.post("/app/<launch_id>/api/goals")
def set_goal(launch_id: str) -> Response:
    return relationship.set_goal(launch_id)


@bp.post("/app/<launch_id>/api/goals/<goal_id>")
def edit_goal(launch_id: str, goal_id: str) -> Response:
    return relationship.edit_goal(launch_id, goal_id)


@bp.post("/app/<launch_id>/api/tasks")
def assign_task(launch_id: str) -> Response:
    return relationship.assign_task(launch_id)


@bp.post("/app/<launch_id>/api/tasks/<task_id>/cancel")
def cancel_task(launch_id: str, task_id: str) -> Response:
    return relationship.cancel_task(launch_id, task_id)


@bp.post("/app/<launch_id>/api/messages")
def send_message(launch_id: str) -> Response:
    return relationship.send_message(launch_id)


@bp.post("/app/<launch_id>/api/messages/read")
def mark_messages_read(launch_id: str) -> Response:
    return relationship.mark_read(launch_id)


@bp.get("/app/<launch_id>/api/enrollment")
def enrollment_status(launch_id: str) -> Response:
    return prescribe.get(launch_id)


@bp.post("/app/<launch_id>/api/enrollment")
def prescribe_app(launch_id: str) -> Response:
    return prescribe.prescribe(launch_id, dashboard.json_body())


@bp.post("/app/<launch_id>/api/enrollment/<enrollment_id>/end")
def end_enrollment(launch_id: str, enrollment_id: str) -> Response:
    return prescribe.end(launch_id, enrollment_id)


def _is_ours() -> bool:
    return request.blueprint == "smart_app" or request.path.startswith(("/launch", "/callback/", "/app/"))


@bp.after_app_request
def _headers(response: Response) -> Response:
    if _is_ours():
        https = urlsplit(services.current().settings.public_url).scheme == "https"
        web.secure_headers(response, https=https)
        if request.endpoint == "smart_app.static":
            # Scripts and styles hold no patient data: let the browser revalidate them (ETag).
            response.headers["Cache-Control"] = "no-cache"
    return response


def init_app(app: Flask, *, make_reader: ReaderFactory | None = None) -> None:
    with app.app_context():
        settings = services.current().settings
    install(app, SmartState(cookies=web.CookiePolicy.from_settings(settings)))
    web.init_app(app)
    if make_reader is None:
        from smart_app.fhir_reader import client_reader

        make_reader = client_reader
    app.extensions[_READER_KEY] = make_reader
    app.register_blueprint(bp)


__all__ = ["bp", "init_app", "state"]
