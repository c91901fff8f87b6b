"""Checkpoints in the layout transformers writes for `DiffusionGemmaForBlockDiffusion`.

Design choices:
- Safetensors only. Anything pickled (`.bin`, `.pt`, `.pth`, `.ckpt`) is refused before it is opened.
- Tensors are memory-mapped: the file is mapped copy-on-write and each tensor is a view into the mapping; a
  tensor is copied only when its dtype must change. The model is built on the meta device and takes those
  tensors by assignment, so nothing is allocated twice.
- One mapping between checkpoint names and module names. The checkpoint stores the decoder's weights; the
  encoder's are tied to them (omitted) except its per-layer scalars. Vision weights are skipped with one notice.
- Every missing, unexpected and mis-shaped tensor is reported in one error, by name, with both shapes.
- Saves write to a temporary directory that replaces the target in one rename, so a crash never leaves a
  half-written checkpoint; large models are sharded with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from .allocator import page_out, release_free_memory
from .config import ModelConfig
from .gguf import GGUFCheckpoint
from .model import DiffusionGemma, Experts, attach, attached_weights
from .onednn import ReorderedExperts, available as onednn_available
from .quantized import (QUANTIZED_TYPES, CpuInt4, GroupQuantized, cpu_int4_layout, is_expert,
                        keeps_one_row_copy, keeps_tiles, quantized_weights, scheme_type)

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is."""


# ---- where a checkpoint is ---------------------------------------------------------------------------------------

HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]


def bundled_model_dir() -> Path:
    """The small model that ships inside the package."""
    return Path(__file__).parent / "bundled"


def looks_like_repo_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and "\\" not in value


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def resolve_checkpoint(value: str | Path | None) -> Path:
    """The checkpoint for a path (a directory, or a .gguf file), a Hugging Face repo id (from the local Hugging
    Face cache, or downloaded when the network allows and HF_HUB_OFFLINE is not set), or None for the bundled
    model."""
    if value is None:
        return bundled_model_dir()
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a checkpoint directory: it has no config.json")
        return path
    if is_gguf(path):
        return path
    if path.is_file():
        raise CheckpointError(f"{path} is a file; dgemma loads a checkpoint directory (config.json and "
                              "safetensors, as save_pretrained writes it) or a .gguf file")
    if isinstance(value, str) and looks_like_repo_id(value):
        return _from_hub(value)
    raise FileNotFoundError(f"{path} does not exist (give a checkpoint directory or a Hugging Face repo id)")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                              f"HF_HUB_OFFLINE is set (download it first, e.g. `hf download {repo_id}`)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as err:  # network, authentication, a repo that does not exist: all end the same way here
        raise CheckpointError(f"{repo_id} is not in the local Hugging Face cache and could not be downloaded "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


# ---- reading safetensors ---------------------------------------------------------------------------------------

class SafetensorsFile:
    """A safetensors file mapped into memory; `tensor(name)` returns views into the mapping."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path} is too short to be a safetensors file")
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len > size - 8:
                raise CheckpointError(f"{path} is not a safetensors file (header length {header_len} > file size)")
            try:
                header = json.loads(handle.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                raise CheckpointError(f"{path} is not a safetensors file: bad header ({err})") from err
            if not isinstance(header, dict):
                raise CheckpointError(f"{path} is not a safetensors file: its header is a JSON "
                                      f"{type(header).__name__}, not an object")
            header.pop("__metadata__", None)
            for name, entry in header.items():
                _check_entry(path, name, entry, size - 8 - header_len)
            # Copy-on-write: tensors may be written by the model later without touching the file.
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + header_len else None
        self.entries: dict[str, dict[str, Any]] = header
        self._data_start = 8 + header_len

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name]["dtype"]
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]

    def tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype, shape = self.dtype(name), tuple(entry["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self._data_start + begin)
        return flat.view(shape)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    """A header entry is {"dtype", "shape", "data_offsets"} whose bytes lie inside the file and match its shape."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: its header entry is not an object")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise CheckpointError(f"{where}: data_offsets {offsets} lie outside the file's {data_size} data bytes")
    code = entry.get("dtype")
    if code in _SAFETENSORS_DTYPES and end - begin != math.prod(shape) * _SAFETENSORS_DTYPES[code].itemsize:
        raise CheckpointError(f"{where}: {end - begin} bytes do not hold {code} {tuple(shape)}")


def _read_index(index: Path) -> list[str]:
    """The shard file names an index lists: plain names of files in the checkpoint directory, nothing outside it."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError) as err:
        raise CheckpointError(f"{index} is not a safetensors index: {err}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    outside = [name for name in files if Path(name).name != name or name in ("", ".", "..") or "\\" in name]
    if outside:
        raise CheckpointError(f"{index} names shard(s) outside the checkpoint directory: {', '.join(outside)}")
    return files


def _weight_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    index = directory / INDEX_FILE
    if index.is_file():
        files = _read_index(index)
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return [directory / name for name in files]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickled weights ({', '.join(pickles)}); dgemma loads safetensors only, because "
            "unpickling can run arbitrary code. Convert them with a tool you trust to model.safetensors.")
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory} (found: {', '.join(found) or 'nothing'})")


def read_tensors(directory: str | Path) -> Iterator[tuple[str, SafetensorsFile]]:
    """(checkpoint name, file holding it) for every tensor of a checkpoint directory."""
    for path in _weight_files(Path(directory)):
        shard = SafetensorsFile(path)
        for name in shard.entries:
            yield name, shard


# ---- names -----------------------------------------------------------------------------------------------------

_PREFIXES = (("model.encoder.language_model.", "encoder."), ("model.decoder.", "decoder."), ("lm_head.", "lm_head."))


def module_name(name: str) -> str | None:
    """Module state name of a checkpoint tensor (None if it belongs to no text-model module)."""
    for checkpoint_prefix, module_prefix in _PREFIXES:
        if name.startswith(checkpoint_prefix):
            return module_prefix + name.removeprefix(checkpoint_prefix)
    return None


def checkpoint_name(name: str) -> str:
    for checkpoint_prefix, module_prefix in _PREFIXES:
        if name.startswith(module_prefix):
            return checkpoint_prefix + name.removeprefix(module_prefix)
    raise KeyError(name)


def to_checkpoint_names(model: DiffusionGemma) -> dict[str, torch.Tensor]:
    """The model's tensors under the names transformers uses, tied copies omitted as transformers omits them."""
    tied = {"encoder." + name for name in model.tied_parameter_names()}
    names = {checkpoint_name(name): tensor for name, tensor in model.state_dict().items() if name not in tied}
    # Experts held in oneDNN's layout are not in the state dict: their tensors, given back (the decoder's names).
    reordered = attached_weights(model, (ReorderedExperts,))
    names.update({checkpoint_name(name): weight.dense() for name, weight in reordered})
    return names


# ---- loading -----------------------------------------------------------------------------------------------------

def checkpoint_dtype(directory: str | Path) -> torch.dtype:
    """The dtype most of a checkpoint's floating-point tensors are stored in."""
    sizes: dict[torch.dtype, int] = {}
    for name, shard in read_tensors(directory):
        dtype = shard.dtype(name)
        if dtype.is_floating_point:
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(shard.shape(name))
    if not sizes:
        raise CheckpointError(f"{directory} holds no floating-point tensors")
    return max(sizes, key=sizes.get)


def load_model(directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               config: ModelConfig | None = None, model_class: type[DiffusionGemma] = DiffusionGemma,
               quantize: str | None = None, one_row: bool = False) -> DiffusionGemma:
    """Build a `model_class` from a checkpoint directory, converting weights to `dtype` (default: as stored).
    `quantize` (a scheme of `dgemma.quantized.scheme_type`) keeps the scheme's matrices quantised
    instead, computed in `dtype`; they are quantised one at a time, as they are read. `one_row`: 4-bit experts
    laid out for one row at a time (`dgemma.quantized.cpu_int4_layout`)."""
    directory = Path(directory)
    config = config or ModelConfig.from_file(directory)
    dtype = dtype or checkpoint_dtype(directory)
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = tied_names(model)
    loaded: dict[str, torch.Tensor] = {}
    unexpected, misshaped, skipped = [], [], 0
    for name, shard in read_tensors(directory):
        if name.startswith(SKIPPED_PREFIXES):
            skipped += 1
            continue
        target = module_name(name)
        if target in tied or (target == "lm_head.weight" and config.tie_word_embeddings):
            continue  # a tied copy: the decoder's tensor is the one that counts, as in transformers
        shape = shard.shape(name)
        if target not in expected:
            unexpected.append(f"{name} {shape}")
        elif expected[target] != shape:
            misshaped.append(f"{name}: expected {expected[target]}, found {shape}")
        else:
            loaded[target] = shard.tensor(name)
    missing = [f"{checkpoint_name(name)} {shape}" for name, shape in expected.items()
               if name not in loaded and name not in tied]
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {directory} does not match its config.json:"]
        lines += [f"  missing: {m}" for m in missing]
        lines += [f"  unexpected: {u}" for u in unexpected]
        lines += [f"  wrong shape: {s}" for s in misshaped]
        raise CheckpointError("\n".join(lines))
    if skipped:
        logger.warning("skipped %d vision tensors: dgemma runs the text model only", skipped)
    quantized = {}
    for name in list(loaded) if quantize else []:
        qtype = scheme_type(checkpoint_name(name), tuple(loaded[name].shape), quantize)
        if qtype is not None:
            quantized[name] = GroupQuantized.quantize(loaded.pop(name), qtype).to(device, dtype)
    state = {name: _convert(tensor, dtype, device, checkpoint_name(name)) for name, tensor in loaded.items()}
    return _assign(model, state, device, quantized, one_row)


def tied_names(model: DiffusionGemma) -> dict[str, str]:
    """Encoder state names that are the decoder's tensors (stored once, under the decoder's name)."""
    return {"encoder." + name: "decoder." + name for name in model.tied_parameter_names()}


def attach_tied(model: DiffusionGemma, tied: dict[str, str], name: str, weight: object) -> None:
    """`attach` a weight held in a kernel's form at the decoder's `name` and at every encoder name tied to it
    (`tied_names`): one object for both."""
    for target in [name, *(encoder for encoder, decoder in tied.items() if decoder == name)]:
        attach(model, target, weight)


def _assign(model: DiffusionGemma, state: dict[str, torch.Tensor], device: str | torch.device,
            quantized: dict[str, GroupQuantized] | None = None, one_row: bool = False) -> DiffusionGemma:
    """Give a model built on the meta device its tensors (tied names share the decoder's); `quantized` weights (by
    module name) take the place of their parameters, in the decoder and in the encoder that ties to it (4-bit
    matrices and Q8_0 experts computed in bf16 on the CPU in a CPU int4 kernel's layout, the experts' for a canvas's
    rows or with `one_row` for one token's: `dgemma.quantized.cpu_int4_layout`)."""
    tied = tied_names(model)
    quantized = quantized or {}
    quantized_count = len(quantized)
    for name in list(quantized):
        weight = quantized.pop(name)  # not held twice while converted
        owner = model.get_submodule(name.rpartition(".")[0])
        layout = cpu_int4_layout(name, weight, device, linear_only=isinstance(owner, nn.Linear)
                                 and owner is not model.lm_head, one_row=one_row)
        if layout is not None:
            weight = CpuInt4.from_grouped(weight, layout, one_row_copy=keeps_one_row_copy(name, layout),
                                          keep_tiles=keeps_tiles(name, layout, one_row))
        attach_tied(model, tied, name, weight)
    state.update({encoder: state[decoder] for encoder, decoder in tied.items() if decoder in state})
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assignment gave tied names separate Parameter objects
    model.reset_rope(device)
    if quantized_count:
        release_free_memory()  # the decoding and repacking temporaries, kept by a tuned allocator
    return model.eval()


def reorder_experts(model: DiffusionGemma) -> int:
    """Hold each large bf16 expert weight of a model on the CPU in oneDNN's blocked layout (`ReorderedExperts`, the
    same bytes, in the parameter's place), for a canvas's few rows an expert (`dgemma.onednn`); the decoder's weight
    and the encoder's tied one stay one object. Returns how many weights were reordered: none where this CPU's
    oneDNN has no bf16, nor experts small, quantised, in another dtype or off the CPU. For a model loaded to decode,
    not to train: the reordered weights are not parameters."""
    if not onednn_available():
        return 0
    tied = tied_names(model)
    # A canvas's rows an expert on average (256 x 8 / 128 = 16 for the released model): oneDNN's layout hint.
    rows = max(1, model.config.canvas_length * (model.config.top_k_experts or 1) // (model.config.num_experts or 1))
    reordered = 0
    for path, module in model.decoder.named_modules(prefix="decoder"):
        if not isinstance(module, Experts):
            continue
        for attr in ("gate_up_proj", "down_proj"):
            weight = getattr(module, attr)
            if not (isinstance(weight, torch.Tensor) and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
                    and module.large):
                continue
            held = ReorderedExperts.from_tensor(weight.detach(), rows)
            page_out(weight)  # if it views the checkpoint's file, its pages (read once) leave the resident set
            name = f"{path}.{attr}"
            attach_tied(model, tied, name, held)
            reordered += 1
    return reordered


def load_gguf_model(checkpoint: GGUFCheckpoint, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    model_class: type[DiffusionGemma] = DiffusionGemma,
                    keep_quantized: bool | str = True, one_row: bool = False) -> DiffusionGemma:
    """Build a `model_class` from a read GGUF file. Quantised matrices stay quantised (`GroupQuantized`, computed in
    `dtype`) unless `keep_quantized` is False (with "experts", only the experts' matrices); every other tensor is
    dequantised exactly as the `gguf` library does and cast to `dtype` (default: bfloat16 when the file holds
    quantised tensors, else its float type). The file's tensors were checked against its metadata when it was
    read. `one_row`: 4-bit experts laid out for one row at a time (`dgemma.quantized.cpu_int4_layout`)."""
    config = ModelConfig.from_dict(checkpoint.config)
    if dtype is None:
        floats = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        types = set(checkpoint.tensor_types.values())
        dtype = floats[max(types, key=list(checkpoint.tensor_types.values()).count)] if types <= set(floats) \
            else torch.bfloat16
    with torch.device("meta"):
        model = model_class(config)
    state, quantized = {}, {}
    for name in checkpoint.tensor_names():
        data, qtype, shape = checkpoint.raw(name)
        keep = keep_quantized is True or (keep_quantized == "experts" and is_expert(name))
        if keep and qtype.name in QUANTIZED_TYPES and len(shape) >= 2:
            quantized[module_name(name)] = GroupQuantized.from_gguf(data, qtype, shape).to(device, dtype)
        else:
            state[module_name(name)] = checkpoint.dequantized(name, dtype).to(device)
    return _assign(model, state, device, quantized, one_row)


def _convert(tensor: torch.Tensor, dtype: torch.dtype, device: str | torch.device, name: str) -> torch.Tensor:
    # Layer scalars and weights alike take the model dtype, as from_pretrained(dtype=...) gives them.
    if not tensor.dtype.is_floating_point:
        raise CheckpointError(f"tensor {name} is stored as {tensor.dtype}; expected a floating-point type")
    return tensor.to(device=device, dtype=dtype)


# ---- saving ------------------------------------------------------------------------------------------------------

def save_model(model: DiffusionGemma, directory: str | Path, max_shard_bytes: int = 5 * 2**30,
               extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write config.json and safetensors (sharded above `max_shard_bytes`) atomically into `directory`."""
    directory = Path(directory)
    if any(True for _ in quantized_weights(model)):
        raise CheckpointError(f"cannot save to {directory}: the model's weights are kept quantised, and safetensors "
                              "checkpoints hold floating point (load it with keep_quantized=False, or write a "
                              "GGUF file with dgemma quantize)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in to_checkpoint_names(model).items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.config.save(tmp)
        shards = _plan_shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(tensors, tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: tensors[n] for n in names}, tmp / file, metadata={"format": "pt"})
                weight_map.update({n: file for n in names})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        for name, content in (extra_files or {}).items():
            path = tmp / name
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        _replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def export_gguf(directory: str | Path, out: str | Path, scheme: str) -> tuple[Path, dict[str, str]]:
    """Write a safetensors checkpoint as a DiffusionGemma GGUF file (llama.cpp's layout, so other runtimes read it)
    with its matrices quantised by `scheme` (`dgemma.quantized.scheme_type`), the rest F32, its generation settings,
    tokenizer and chat template in the metadata. Returns the path and the quantised tensors' types."""
    from .gguf import write_gguf

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    tensors = to_checkpoint_names(load_model(directory, dtype=torch.float32))
    types = {name: qtype for name, tensor in tensors.items()
             if (qtype := scheme_type(name, tuple(tensor.shape), scheme)) is not None}

    def text(name: str) -> str | None:
        return (directory / name).read_text() if (directory / name).is_file() else None

    generation, tokenizer_config = text("generation_config.json"), text("tokenizer_config.json")
    tokenizer_config = json.loads(tokenizer_config) if tokenizer_config else {}
    path = write_gguf(out, config, tensors, types=types,
                      generation=json.loads(generation) if generation else None,
                      tokenizer_json=text("tokenizer.json"), tokenizer_config=tokenizer_config,
                      chat_template=text("chat_template.jinja") or tokenizer_config.get("chat_template"))
    return path, types


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _replace_directory(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing target is moved aside first and removed only after the swap."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
