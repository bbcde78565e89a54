"""Released checkpoint folders share one weight layout: safetensors shards, `model.safetensors.index.json`
(always written; some original loaders read nothing else) and a config.json in the dtype the weights hold."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlm_finetune.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: those its index names, or the one `model.safetensors`.
    ConfigError for a folder of pickled weights or none."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if (folder / "pytorch_model.bin.index.json").is_file() or (folder / "pytorch_model.bin").is_file():
        raise ConfigError(f"{folder} holds pytorch_model.bin weights; convert them to safetensors first "
                          "(python -c \"from safetensors.torch import save_file; ...\") "
                          "- pickled weights are not loaded")
    raise ConfigError(f"{folder} has no model.safetensors or {INDEX_FILE} (pickled .bin weights are not loaded; "
                      "convert them to safetensors first)")


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the size its tensors need (8 + header + data); ConfigError naming the file
    when the header cannot be read."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            raise ValueError(f"its header length ({length}) does not fit in its {size:,} bytes")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return header, 8 + length + max(ends, default=0)


def check_model_folder(folder: Path | None) -> None:
    """`check_weight_files` for a folder in the safetensors layout (an index or `model.safetensors`); any other
    folder is left to the family's loader, which says what it needs."""
    if folder is not None and ((Path(folder) / INDEX_FILE).is_file() or (Path(folder) / "model.safetensors").is_file()):
        check_weight_files(folder)


def check_weight_files(folder: Path) -> list[Path]:
    """Before any weight loads: the index is JSON and every shard it names is there; each safetensors header reads
    and its file holds every byte the header promises (a truncated copy is found here, not as a raw library error
    halfway through the load); every tensor the index names is in the shard it names. Returns the files."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    named: dict[str, str] = {}
    if index.is_file():
        try:
            named = json.loads(index.read_text())["weight_map"]
            if not isinstance(named, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{index} cannot be read ({type(err).__name__}: {err}); copy the folder's index again "
                              "from the released checkpoint") from None
    files = weight_files(folder)
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise ConfigError(f"{index} names {len(missing)} shard(s) that are not in {folder}: {show_keys(missing)}; "
                          "copy the missing files (an interrupted download or copy?)")
    for path in files:
        try:
            header, needed = _header(path)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise ConfigError(f"{path} is not a readable safetensors file ({err}); copy it again from the released "
                              "checkpoint") from None
        size = path.stat().st_size
        if size < needed:
            raise ConfigError(f"{path} is truncated: {size:,} bytes, its header describes {needed:,}; copy it again "
                              "(an interrupted download or copy?)")
        absent = [key for key, shard in named.items() if shard == path.name and key not in header]
        if absent:
            raise ConfigError(f"{index} places {len(absent)} tensor(s) in {path.name} that it does not hold: "
                              f"{show_keys(absent)}; the index and the shards come from different copies")
    return files


def read_config_json(folder: Path, what: str) -> dict:
    """The folder's config.json as a dict; ConfigError naming `what` the folder should be when it is missing,
    and the parse error when it is not JSON."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.path={folder} has no config.json; point it at {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from err


def folder_reader(folder: Path) -> "ShardReader":
    """A `ShardReader` over the folder's weight files, each checked to exist."""
    files = weight_files(folder)
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path} is named in {INDEX_FILE} but does not exist")
    return ShardReader(files)


def show_keys(keys: list[str]) -> str:
    """The first keys of a list, and how many there are."""
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def write_shards(released: dict[str, torch.Tensor], folder: Path, shards: list[list[str]],
                 single_name: str | None = None) -> None:
    """Each list of names in `shards` into `model-0000i-of-0000n.safetensors` (`single_name` when there is one
    shard and the layout names it so), and the index mapping every name to its file."""
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        fname = single_name if single_name and len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: released[k] for k in names}, str(Path(folder) / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        total += sum(released[k].numel() * released[k].element_size() for k in names)
    (Path(folder) / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                      indent=2))


def written_dtype(released: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype most of the weights hold (what config.json's torch_dtype should say)."""
    floats = [t.dtype for t in released.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else None


# safetensors' dtype names
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class ShardReader:
    """The tensors of a checkpoint's safetensors files, read one at a time (`get`) with positioned reads, every
    key name known from the files' headers before any tensor is read (`names`). Not memory-mapped: the pages of
    a mapped file that a read touches count in the process's resident size until it is unmapped, so a rank
    reading a 90 GB checkpoint through a map would look (and be accounted) as large as the checkpoint."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for path in files:
            with open(path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self._where[name] = (Path(path), entry, 8 + size)

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def get(self, name: str) -> torch.Tensor:
        path, entry, data_start = self._where[name]
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: {name} has dtype {entry['dtype']}, which this reader does not know")
        buffer = bytearray(end - begin)
        with open(path, "rb", buffering=0) as handle:
            handle.seek(data_start + begin)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                got = handle.readinto(view[done:])
                if not got:
                    raise ValueError(f"{path} ends inside tensor {name}")
                done += got
        if not buffer:
            return torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        return torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class LazyTensors:
    """The released tensors of one model tensor, each read when it is indexed (`assemble` holds one at a time)."""

    def __init__(self, reader: ShardReader, names: list[str]):
        self.reader, self.names = reader, list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.reader.get(self.names[index])


def stack_experts(tensors, per_expert: int) -> torch.Tensor:
    """A fused 3-D expert tensor from its per-expert released matrices (`per_expert` of them each, joined along
    the rows: gate and up, or one down), written into one new tensor piece by piece: the result and one piece are
    all that is ever held."""
    if len(tensors) % per_expert:
        raise ValueError(f"{len(tensors)} tensors, not {per_expert} per expert")
    first = tensors[0]
    rows = first.shape[0]
    out = torch.empty((len(tensors) // per_expert, per_expert * rows, *first.shape[1:]), dtype=first.dtype)
    for index in range(len(tensors)):
        piece = first if index == 0 else tensors[index]
        if tuple(piece.shape) != tuple(first.shape):
            raise ValueError(f"expert matrices of shapes {tuple(first.shape)} and {tuple(piece.shape)}")
        expert, part = divmod(index, per_expert)
        out[expert, part * rows:(part + 1) * rows] = piece
        del piece
    return out


def stream_into(model: torch.nn.Module, sources: dict[str, list[str]], assemble, reader: ShardReader,
                skip: set[str] = frozenset()) -> None:
    """For each state-dict tensor of `model` (whole, or partitioned by ZeRO-3's zero.Init), `assemble(name,
    tensors)` the released tensors `sources[name]` names into one (`tensors` reads each when indexed) and copy it
    in; only that tensor (and one piece of it) is ever whole in memory. `skip`: names that are not read (a tied
    head). Shapes are checked (ValueError)."""
    from vlm_finetune.models._partitioned import copy_into, logical_shape

    for name, target in model.state_dict(keep_vars=True).items():
        if name in skip or name not in sources:
            continue
        value = assemble(name, LazyTensors(reader, sources[name]))
        if tuple(value.shape) != logical_shape(target):
            raise ValueError(f"{name} has shape {tuple(value.shape)} in the checkpoint, the model expects "
                             f"{logical_shape(target)}")
        copy_into(target, value.to(target.dtype))
        del value
