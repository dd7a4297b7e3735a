"""Load a Hugging Face Llama 4 checkpoint into our modules: key prefixes and expert layouts live here.

Checkpoint quirks handled in one place:
- `Llama4ForConditionalGeneration` keys carry `language_model.`; `Llama4ForCausalLM` keys do not.
- Routed experts are fused (`experts.gate_up_proj` [E,D,2F], `experts.down_proj` [E,F,D]) or
  per-expert Linear weights (`experts.{e}.{gate,up,down}_proj.weight`, [F,D]/[F,D]/[D,F]).
- Vision tower and projector keys are ignored.
- FP8 checkpoints (`model.quant`): quantized modules keep their FP8 `weight` and its `weight_scale`;
  FP8 routed experts come only as per-expert keys.
Only the rows of the experts a module holds are read.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.checkpoint import CheckpointError, CheckpointReader
from model.moe import RoutedExperts
from model.quant import FP8, load_scheme, quantize_modules

log = logging.getLogger(__name__)

TEXT_PREFIX = "language_model."
IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")
_EXPERT_PARAM = re.compile(r"^(?P<layer>.*\.feed_forward\.experts)\.(?P<name>gate_up_proj|down_proj)$")
_FP8_EXPERT_PARAM = re.compile(r"^(?P<layer>.*\.feed_forward\.experts)\."
                               r"(?P<name>gate_up_weight|down_weight)(?P<scale>_scale)?$")


@dataclass
class LoadReport:
    tensors: int
    bytes_read: int
    keys_read: list[str]


def text_prefix(reader: CheckpointReader) -> str:
    return TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in reader.keys()) else ""


def load_model(model: nn.Module, reader: CheckpointReader, dtype: torch.dtype,
               strict: bool = True) -> LoadReport:
    """Fill every parameter of `model` (named like HF `Llama4ForCausalLM`) from the checkpoint.

    With `strict`, text weights the model does not hold are an error (a wrong config); pass
    `strict=False` for a module that deliberately owns a part (an attention or expert worker).
    """
    prefix = text_prefix(reader)
    before = reader.bytes_read
    used: set[str] = set()
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        m = _EXPERT_PARAM.match(name)
        fp8 = _FP8_EXPERT_PARAM.match(name)
        if m:
            experts = modules[m["layer"]]
            assert isinstance(experts, RoutedExperts)
            tensor, keys = read_experts(reader, prefix + m["layer"], m["name"], experts.expert_ids)
        elif fp8:
            tensor, keys = read_fp8_experts(reader, prefix + fp8["layer"], fp8["name"], bool(fp8["scale"]),
                                            modules[fp8["layer"]].expert_ids)
        else:
            keys = [prefix + name]
            tensor = reader.read(keys[0])
        if keys:
            _copy(param, tensor, keys[0], reader, dtype)
        used.update(keys)
    if strict:
        _check_unexpected(reader, prefix, used)
    report = LoadReport(len(used), reader.bytes_read - before, sorted(used))
    log.info("loaded %d tensors, %.1f MB from %s", report.tensors, report.bytes_read / 1e6, reader.dir)
    return report


def read_experts(reader: CheckpointReader, experts_key: str, name: str,
                 expert_ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """Rows of `gate_up_proj` [e,D,2F] or `down_proj` [e,F,D] for the given experts, in that order."""
    fused = f"{experts_key}.{name}"
    if not expert_ids:  # a worker without routed experts reads nothing
        return torch.empty(0), []
    if fused in reader.tensors:
        return reader.read(fused, rows=list(expert_ids)), [fused]
    if f"{experts_key}.0.down_proj.weight" not in reader.tensors:
        raise CheckpointError(f"checkpoint {reader.dir} has neither {fused!r} nor per-expert keys "
                              f"{experts_key}.<e>.*_proj.weight")
    keys, rows = [], []
    for e in expert_ids:
        if name == "down_proj":  # Linear [D,F] -> [F,D]
            keys.append(f"{experts_key}.{e}.down_proj.weight")
            rows.append(reader.read(keys[-1]).t())
        else:  # [gate | up] on the last dim, each Linear [F,D] -> [D,F]
            gate, up = f"{experts_key}.{e}.gate_proj.weight", f"{experts_key}.{e}.up_proj.weight"
            keys += [gate, up]
            rows.append(torch.cat([reader.read(gate).t(), reader.read(up).t()], dim=-1))
    return torch.stack(rows), keys


def read_fp8_experts(reader: CheckpointReader, experts_key: str, name: str, scale: bool,
                     expert_ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """FP8 experts [e, out, in] (or their scales [e, out, 1]) from per-expert keys, as stored: no transpose.
    `gate_up_weight` stacks the gate rows over the up rows."""
    if not expert_ids:
        return torch.empty(0), []
    suffix = ".weight_scale" if scale else ".weight"
    parts = ("down_proj",) if name == "down_weight" else ("gate_proj", "up_proj")
    keys, rows = [], []
    for e in expert_ids:
        names = [f"{experts_key}.{e}.{part}{suffix}" for part in parts]
        for key in names:
            if key not in reader.tensors:
                raise CheckpointError(f"FP8 checkpoint {reader.dir} has no tensor {key!r} (FP8 routed experts "
                                      f"need per-expert weights and weight_scale)")
        keys += names
        rows.append(torch.cat([reader.read(k) for k in names]))
    return torch.stack(rows), keys


def _copy(param: torch.Tensor, tensor: torch.Tensor, key: str, reader: CheckpointReader,
          dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        file = reader.tensors[key].file.name if key in reader.tensors else "?"
        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                              f"the config expects {tuple(param.shape)}")
    if param.dtype == FP8:  # FP8 storage stays FP8 (a quantized module)
        if tensor.dtype != FP8:
            raise CheckpointError(f"tensor {key!r} is {tensor.dtype}, but quantization_config quantizes its "
                                  f"module to float8_e4m3fn")
        dtype = FP8
    elif key.endswith("weight_scale"):
        dtype = torch.float32  # scales stay exact
    with torch.no_grad():
        param.data = tensor.to(device=param.device, dtype=dtype).contiguous()


def _check_unexpected(reader: CheckpointReader, prefix: str, used: set[str]) -> None:
    for key in sorted(reader.keys() - used):
        if key.startswith(IGNORED_PREFIXES):
            continue
        file = reader.tensors[key].file.name
        if prefix and not key.startswith(prefix):
            raise CheckpointError(f"{file}: unexpected tensor {key!r} (neither text nor vision)")
        raise CheckpointError(f"{file}: unexpected tensor {key!r}: the config.json does not describe it")


def apply_quantization(model: nn.Module, model_dir: str | Path) -> nn.Module:
    """Swap in the FP8 modules an FP8 checkpoint needs (a no-op for bf16/fp32); call on the meta model."""
    scheme = load_scheme(model_dir)
    return model if scheme is None else quantize_modules(model, scheme)


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give a module built on the meta device real (uninitialised) storage and real buffers."""
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return model


def load_pretrained(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu"):
    """Config + full model, every weight loaded: the single-process path."""
    from model.config import load_config
    from model.decoder import Llama4ForCausalLM

    config = load_config(model_dir)
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    apply_quantization(model, model_dir)
    materialize(model, device)
    with CheckpointReader(model_dir) as reader:
        load_model(model, reader, dtype)
    return model.eval()


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None, device: str = "cpu") -> torch.dtype:
    """Compute dtype: as asked, else float32 on CPU (bf16 checkpoints are upcast) and bfloat16 on GPU."""
    if name is None or name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]
