"""Serve config files for `rayinfer serve CONFIG.yaml`: the same YAML `serve run` and `serve deploy` take.

A file names `rayinfer.cluster.serve_app:app_builder` as each application's `import_path`, gives engine
arguments under `args`, and per-deployment Serve settings (autoscaling, queue limits) under `deployments`.
Command-line flags override the file's engine arguments and HTTP address.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APP_BUILDER = "rayinfer.cluster.serve_app:app_builder"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@dataclass
class ServedApp:
    name: str
    route_prefix: str
    args: dict[str, Any]
    deployment_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def build(self) -> Any:
        from rayinfer.cluster.serve_app import build_app_from_args

        return build_app_from_args(self.args, deployment_options=self.deployment_options)


@dataclass
class ServeConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    apps: list[ServedApp] = field(default_factory=list)


def load_serve_config(path: str | Path) -> ServeConfig:
    """Reads and checks a Serve config file with Serve's own schema, so a misspelt key fails here."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path} is not a valid Serve config file: {exc}") from None
    # Serve's schema ignores unknown keys; a misspelt `autoscaling_config` would silently not scale.
    _check_keys(path, "the file", raw, ServeDeploySchema)
    _check_keys(path, "http_options", raw.get("http_options") or {}, HTTPOptionsSchema)
    for app in raw.get("applications") or []:
        _check_keys(path, f"application {app.get('name')!r}", app, ServeApplicationSchema)
        for deployment in app.get("deployments") or []:
            _check_keys(path, f"deployment {deployment.get('name')!r}", deployment, DeploymentSchema)
    http = raw.get("http_options") or {}
    config = ServeConfig(host=http.get("host", DEFAULT_HOST), port=int(http.get("port", DEFAULT_PORT)))
    for app in raw.get("applications") or []:
        if app["import_path"] != APP_BUILDER:
            raise ValueError(f"{path}: application {app.get('name')!r} has import_path {app['import_path']!r}; "
                             f"rayinfer serves `{APP_BUILDER}` (use `serve run` for other applications)")
        options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
        config.apps.append(ServedApp(
            name=app.get("name", "default"),
            route_prefix=app.get("route_prefix", "/"),
            args=dict(app.get("args") or {}),
            deployment_options=options,
        ))
    if not config.apps:
        raise ValueError(f"{path} lists no applications")
    return config


def _check_keys(path: Path, where: str, data: dict[str, Any], schema: Any) -> None:
    unknown = sorted(set(data) - set(schema.model_fields))
    if unknown:
        raise ValueError(f"{path} is not a valid Serve config file: unknown key(s) {', '.join(unknown)} in {where} "
                         f"(allowed: {', '.join(sorted(schema.model_fields))})")
