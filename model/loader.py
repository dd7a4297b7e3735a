"""Load a Hugging Face Llama 4 checkpoint into our modules: key prefixes and expert layouts live here.

Checkpoint quirks handled in one place:
- `Llama4ForConditionalGeneration` keys carry `language_model.`; `Llama4ForCausalLM` keys do not.
- Routed experts are fused (`experts.gate_up_proj` [E,D,2F], `experts.down_proj` [E,F,D]) or
  per-expert Linear weights (`experts.{e}.{gate,up,down}_proj.weight`, [F,D]/[F,D]/[D,F]).
- Vision tower and projector keys are ignored.
- FP8 checkpoints (`model.quant`): quantized modules keep their FP8 `weight` and its `weight_scale`;
  FP8 routed experts come only as per-expert keys.
Only the rows of the experts a module holds are read. A module named otherwise than the checkpoint
(an expert rank's `ExpertSlices`) passes `names`, its names -> the checkpoint's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
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


class LoadProgress:
    """Bytes a load will read (set before its first read) and bytes copied so far.

    Written by the loading thread, read by others (a rank actor answering `load_progress`): plain int
    attributes, each assignment atomic under the GIL.
    """

    def __init__(self) -> None:
        self.total_bytes = 0
        self.loaded_bytes = 0

    def start(self, total_bytes: int) -> None:
        self.total_bytes, self.loaded_bytes = total_bytes, 0

    def advance(self, nbytes: int) -> None:
        self.loaded_bytes += nbytes


@dataclass(frozen=True)
class _ParamRead:
    """What one parameter takes from the checkpoint: planned (and sized) before anything is read."""
    name: str
    keys: list[str]
    nbytes: int
    read: Callable[[], torch.Tensor]


def expert_slice_names(name: str) -> str:
    """`ExpertSlices` names (`layers.{L}`, `layers.{L}.down_proj`) as the checkpoint's
    (`model.layers.{L}.feed_forward.experts`, `....experts.down_proj`)."""
    return re.sub(r"^layers\.(\d+)", r"model.layers.\1.feed_forward.experts", name)


def text_prefix(reader: CheckpointReader) -> str:
    return TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in reader.keys()) else ""


def load_model(model: nn.Module, reader: CheckpointReader, dtype: torch.dtype,
               strict: bool = True, progress: LoadProgress | None = None, prefix: str | None = None,
               names: Callable[[str], str] | None = None) -> LoadReport:
    """Fill every parameter of `model` (named like HF `Llama4ForCausalLM`) from the checkpoint.

    With `strict`, text weights the model does not hold are an error (a wrong config); pass
    `strict=False` for a module that deliberately owns a part (an attention or expert worker).
    `progress` learns the total bytes before the first read, then counts each parameter as it is copied.
    `prefix` is the checkpoint's key prefix of `model`'s names: the text model's by default; `names`
    maps `model`'s parameter names to the checkpoint's, when they differ.
    """
    prefix = text_prefix(reader) if prefix is None else prefix
    plan = plan_reads(model, reader, prefix, names or (lambda name: name))
    used = {key for p in plan for key in p.keys}
    if strict:  # a wrong config fails before a byte is read
        _check_unexpected(reader, prefix, used)
    progress = progress or LoadProgress()
    progress.start(sum(p.nbytes for p in plan))
    before = reader.bytes_read
    params = dict(model.named_parameters())
    for p in plan:
        _copy(params[p.name], p.read(), p.keys[0], reader, dtype)
        progress.advance(p.nbytes)
    report = LoadReport(len(used), reader.bytes_read - before, sorted(used))
    log.info("loaded %d tensors, %.1f MB from %s", report.tensors, report.bytes_read / 1e6, reader.dir)
    return report


def plan_reads(model: nn.Module, reader: CheckpointReader, prefix: str,
               names: Callable[[str], str]) -> list[_ParamRead]:
    """Every parameter's checkpoint tensors (or expert rows) and their bytes; parameters reading nothing
    (a worker without routed experts) are left out."""
    modules = dict(model.named_modules())
    plan = []
    for name, _ in model.named_parameters():
        checkpoint_name, owner = names(name), modules[name.rpartition(".")[0]]
        m = _EXPERT_PARAM.match(checkpoint_name)
        fp8 = _FP8_EXPERT_PARAM.match(checkpoint_name)
        if m:
            assert isinstance(owner, RoutedExperts)
            keys, nbytes, read = plan_experts(reader, prefix + m["layer"], m["name"], owner.expert_ids)
        elif fp8:
            keys, nbytes, read = plan_fp8_experts(reader, prefix + fp8["layer"], fp8["name"], bool(fp8["scale"]),
                                                  owner.expert_ids)
        else:
            key = prefix + checkpoint_name
            info = reader.info(key)
            keys, nbytes, read = [key], info.end - info.begin, lambda key=key: reader.read(key)
        if keys:
            plan.append(_ParamRead(name, keys, nbytes, read))
    return plan


def _nbytes(reader: CheckpointReader, keys: list[str]) -> int:
    return sum(reader.info(k).end - reader.info(k).begin for k in keys)


def plan_experts(reader: CheckpointReader, experts_key: str, name: str,
                 expert_ids: list[int]) -> tuple[list[str], int, Callable[[], torch.Tensor]]:
    """Rows of `gate_up_proj` [e,D,2F] or `down_proj` [e,F,D] for the given experts, in that order."""
    fused = f"{experts_key}.{name}"
    if not expert_ids:  # a worker without routed experts reads nothing
        return [], 0, lambda: torch.empty(0)
    if fused in reader.tensors:
        ids = list(expert_ids)
        return [fused], len(ids) * reader.info(fused).row_bytes, lambda: reader.read(fused, rows=ids)
    if f"{experts_key}.0.down_proj.weight" not in reader.tensors:
        raise CheckpointError(f"checkpoint {reader.dir} has neither {fused!r} nor per-expert keys "
                              f"{experts_key}.<e>.*_proj.weight")
    parts = ("down_proj",) if name == "down_proj" else ("gate_proj", "up_proj")
    per_expert = [[f"{experts_key}.{e}.{part}.weight" for part in parts] for e in expert_ids]

    def read() -> torch.Tensor:
        # Linear [D,F] -> [F,D] for down; [gate | up] on the last dim, each Linear [F,D] -> [D,F]
        return torch.stack([torch.cat([reader.read(k).t() for k in keys], dim=-1) for keys in per_expert])

    keys = [k for ks in per_expert for k in ks]
    return keys, _nbytes(reader, keys), read


def plan_fp8_experts(reader: CheckpointReader, experts_key: str, name: str, scale: bool,
                     expert_ids: list[int]) -> tuple[list[str], int, Callable[[], torch.Tensor]]:
    """FP8 experts [e, out, in] (or their scales [e, out, 1]) from per-expert keys, as stored: no transpose.
    `gate_up_weight` stacks the gate rows over the up rows."""
    if not expert_ids:
        return [], 0, lambda: torch.empty(0)
    suffix = ".weight_scale" if scale else ".weight"
    parts = ("down_proj",) if name == "down_weight" else ("gate_proj", "up_proj")
    per_expert = [[f"{experts_key}.{e}.{part}{suffix}" for part in parts] for e in expert_ids]
    keys = [k for ks in per_expert for k in ks]
    for key in keys:
        if key not in reader.tensors:
            raise CheckpointError(f"FP8 checkpoint {reader.dir} has no tensor {key!r} (FP8 routed experts "
                                  f"need per-expert weights and weight_scale)")
    return keys, _nbytes(reader, keys), lambda: torch.stack([torch.cat([reader.read(k) for k in ks])
                                                              for ks in per_expert])


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


def apply_quantization(model: nn.Module, model_dir: str | Path,
                       names: Callable[[str], str] | None = None) -> nn.Module:
    """Swap in the FP8 modules an FP8 checkpoint needs (a no-op for bf16/fp32); call on the meta model.
    `names`: as for `load_model`."""
    scheme = load_scheme(model_dir)
    return model if scheme is None else quantize_modules(model, scheme, names)


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


def load_vision_tower(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu"):
    """The vision tower and projector of a `Llama4ForConditionalGeneration` checkpoint; None without one."""
    from model.vision import VisionTower, load_vision_config

    config = load_vision_config(model_dir)
    if config is None:
        return None
    with torch.device("meta"):
        tower = VisionTower(config)
    materialize(tower, device)
    with CheckpointReader(model_dir) as reader:
        if not any(k.startswith("vision_model.") for k in reader.keys()):
            return None  # a config with a vision section but a text-only export
        load_model(tower, reader, dtype, strict=False, prefix="")
    return tower.eval()


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None, device: str = "cpu") -> torch.dtype:
    """Compute dtype: as asked, else float32 on CPU (bf16 checkpoints are upcast) and bfloat16 on GPU."""
    if name is None or name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]
