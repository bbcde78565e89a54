"""Rows of the Arrow files behind a `datasets.Dataset`, read one record batch at a time at its byte offset.

`datasets` memory-maps its Arrow files (IPC stream format) and opens them with pyarrow's `read_all`, which reads
the header of every record batch. With datasets' small batches (100 rows for image data sets: 18 KiB each in
`bench tables`) the kernel's fault-around (64 KiB per page fault) then maps every page of the file into the
process: the whole file counts as resident in the run's process and in each data worker, whatever is drawn.
Here the checking process finds where each record batch starts (`index_stream`), and the run's processes map
the files without reading them and read only the record batch that holds a drawn row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# transforms datasets replays over a mapped file that leave its rows' values as stored (from_parquet writes the
# features into the schema's metadata this way)
METADATA_ONLY = ("replace_schema_metadata",)


@dataclass
class BatchIndex:
    """Where the record batches of a table lie: batch b is in files[file[b]] at byte offset[b] and holds the
    table's rows start[b] .. start[b + 1] - 1 (start[-1] is the row count)."""

    files: list[str]
    file: np.ndarray  # int32, one per batch
    offset: np.ndarray  # int64, one per batch
    start: np.ndarray  # int64, one per batch and one more

    def arrays(self) -> dict[str, np.ndarray]:
        return {"batch_files": np.array(self.files, dtype=np.str_), "batch_file": self.file,
                "batch_offset": self.offset, "batch_start": self.start}

    @classmethod
    def from_arrays(cls, arrays) -> BatchIndex | None:
        if "batch_files" not in arrays:
            return None
        return cls([str(f) for f in arrays["batch_files"]], arrays["batch_file"], arrays["batch_offset"],
                   arrays["batch_start"])


def stream_files(dataset) -> list[str] | None:
    """The Arrow files whose record batches, in order, are the rows of `dataset` (a datasets.Dataset), or None
    when its rows are not simply those (an indices mapping, a table held in memory, a transform replayed over
    the file, columns from several files)."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    if getattr(dataset, "_indices", None) is not None:
        return None
    table = dataset.data
    rows = table.blocks if isinstance(table, ConcatenationTable) else [[table]]
    files = []
    for row in rows:
        if len(row) != 1 or not isinstance(row[0], MemoryMappedTable):
            return None
        if any(name not in METADATA_ONLY for name, _, _ in row[0].replays):  # a cast, a renamed column ...
            return None
        files.append(row[0].path)
    return files


def index_stream(files: list[str], num_rows: int) -> BatchIndex | None:
    """Byte offset and rows of every record batch in these Arrow IPC stream files (read through once, not
    mapped), or None when they are not plain record batches of one schema summing to `num_rows` rows."""
    import pyarrow as pa

    file_numbers, offsets, starts = [], [], [0]
    schema = None
    for number, path in enumerate(files):
        with pa.OSFile(path) as source:
            reader = pa.ipc.MessageReader.open_stream(source)
            while True:
                position = source.tell()
                try:
                    message = reader.read_next_message()
                except StopIteration:
                    break
                if message is None:
                    break
                if message.type == "schema":
                    found = pa.ipc.read_schema(message)
                    if schema is None:
                        schema = found
                    elif not found.equals(schema):
                        return None
                elif message.type == "record batch":
                    batch = pa.ipc.read_record_batch(message, schema)
                    if batch.num_rows:
                        file_numbers.append(number)
                        offsets.append(position)
                        starts.append(starts[-1] + batch.num_rows)
                else:  # dictionary batches: a row cannot be read from its own batch alone
                    return None
    if starts[-1] != num_rows:
        return None
    return BatchIndex(list(files), np.asarray(file_numbers, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
                      np.asarray(starts, dtype=np.int64))


class StreamRows:
    """Row `i` of the table a BatchIndex describes, as a Python dict (columns undecoded, as datasets' arrow
    format gives them). The files are memory-mapped when first read (not on unpickling), so a data worker maps
    its own; only the record batch holding the row is read."""

    def __init__(self, index: BatchIndex):
        self.index = index
        self._opened: dict[int, tuple] = {}

    def __getstate__(self) -> dict:
        return {"index": self.index}

    def __setstate__(self, state: dict) -> None:
        self.index, self._opened = state["index"], {}

    def _file(self, number: int):
        if number not in self._opened:
            import pyarrow as pa

            mapped = pa.memory_map(self.index.files[number])
            schema = pa.ipc.read_schema(pa.ipc.read_message(mapped))
            self._opened[number] = (mapped, schema)
        return self._opened[number]

    def row(self, i: int) -> dict:
        import pyarrow as pa

        batch = int(np.searchsorted(self.index.start, i, side="right")) - 1
        if not 0 <= batch < len(self.index.offset):
            raise IndexError(f"row {i} is not in the table ({int(self.index.start[-1])} rows)")
        mapped, schema = self._file(int(self.index.file[batch]))
        mapped.seek(int(self.index.offset[batch]))
        records = pa.ipc.read_record_batch(pa.ipc.read_message(mapped), schema)
        return records.slice(i - int(self.index.start[batch]), 1).to_pylist()[0]
