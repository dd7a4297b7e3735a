"""Checking a Serve config file before anything starts: Ray's own schema, our unknown-key check (Ray's
schemas silently drop unknown keys, so a typo like `max_ongoing_request` would vanish), and our
application `args` for every application whose `import_path` is ours. Errors name the YAML path.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from ray.serve.schema import ServeDeploySchema

from cluster.config import AppConfig, describe, parse_app_args

OUR_IMPORT_PATHS = ("router.app:build", "router.app.build")

APP_NAME = "maverick"
GRPC_SERVICER = "router.maverick_v1_pb2_grpc.add_GenerationServicer_to_server"


def config_from_flags(args: argparse.Namespace) -> dict:
    """The Serve config `maverick serve --model DIR ...` deploys: one application from the CLI's flags."""
    optional = {"migration_limit": args.migration_limit} if args.migration_limit is not None else {}
    eplb = {k: v for k, v in {"redundant_experts": args.redundant_experts,
                              "rebalance_every_steps": args.rebalance_every_steps,
                              "weight_read_rows": getattr(args, "weight_read_rows", None)}.items() if v is not None}
    if eplb:
        optional["eplb"] = eplb
    autoscaling = {k: v for k, v in {"min_gangs": getattr(args, "min_gangs", None),
                                     "max_gangs": getattr(args, "max_gangs", None),
                                     "target_load": getattr(args, "target_load", None)}.items() if v is not None}
    if autoscaling:  # gangs follow load between the bounds; --num-gangs is the count at start
        optional["autoscaling"] = autoscaling
    if getattr(args, "max_attention_workers", None) is not None:  # from --attention-workers up to this many
        optional["attention_scaling"] = {"min_attention_workers": args.attention_workers,
                                         "max_attention_workers": args.max_attention_workers}
    if getattr(args, "spares", None):  # warm expert-rank processes beside each gang
        optional["spares"] = args.spares
    if getattr(args, "attention_spares", None):
        optional["attention_spares"] = args.attention_spares
    engine = {k: v for k, v in {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                                "max_num_batched_tokens": args.max_num_batched_tokens,
                                "kv_cache_memory": args.kv_cache_memory}.items() if v is not None}
    app_args = {"model": args.model, "served_model_name": args.served_model_name or args.model,
                "attention_workers": args.attention_workers, "expert_workers": args.expert_workers,
                **({"num_gangs": args.num_gangs} if args.num_gangs is not None else {}), **optional,
                "dtype": args.dtype,
                "skip_tokenizer_init": args.skip_tokenizer_init,
                "attention": {"torch_threads": args.torch_threads}, "engine": engine}
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8000},
            "grpc_options": {"port": 9000, "grpc_servicer_functions": [GRPC_SERVICER]},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "router.app:build",
                              "args": app_args}]}


def load_serve_config(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a Serve config file is a mapping with an `applications` list")
    return data


def unknown_keys(model: type[BaseModel], data: Any, path: str) -> list[str]:
    """Keys of `data` that `model` (recursively, through nested models and lists of them) lacks."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = set(fields) | {f.alias for f in fields.values() if f.alias}
    problems = [f"{path}.{key}: unknown key" if path else f"{key}: unknown key" for key in data if key not in names]
    for name, info in fields.items():
        value = data.get(name, data.get(info.alias) if info.alias else None)
        nested, is_list = _model_in(info.annotation)
        if nested is None or value is None:
            continue
        child = f"{path}.{name}" if path else name
        if is_list and isinstance(value, list):
            for i, item in enumerate(value):
                problems += unknown_keys(nested, item, f"{child}[{i}]")
        elif not is_list:
            problems += unknown_keys(nested, value, child)
    return problems


def _model_in(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model inside `X`, `X | None` or `list[X]`, and whether it is a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):
        inner, _ = _model_in(typing.get_args(annotation)[0])
        return inner, True
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found[0] is not None:
                return found
    return None, False


def validate_serve_config(data: dict, source: str = "config") -> tuple[ServeDeploySchema, list[AppConfig | None]]:
    """Ray's schema, the unknown-key check and our `args`; returns the schema and each app's args."""
    try:
        schema = ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{source}: {describe(exc)}") from None
    problems = unknown_keys(ServeDeploySchema, data, "")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    apps: list[AppConfig | None] = []
    for i, app in enumerate(data.get("applications") or []):
        if app.get("import_path") in OUR_IMPORT_PATHS:
            apps.append(parse_app_args(app.get("args") or {}, root=f"applications[{i}].args"))
        else:
            apps.append(None)
    return schema, apps
