"""Data as Parquet and datasets.save_to_disk folders (data/sources.py, issue 31): the same records as a JSON file
give the same samples and train the same adapter; bad records are named by index before any weight loads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_accumulation import COMMON, _adapter, _losses

from conftest import compose_cfg
from vlm_finetune.config import data_settings
from vlm_finetune.data.arrow_rows import StreamRows
from vlm_finetune.data.datamodule import build_datasets
from vlm_finetune.data.sources import DatasetRows, TableConversations, is_table, load_table
from vlm_finetune.errors import DataError
from vlm_finetune.settings import DataSettings

datasets = pytest.importorskip("datasets")

MESSAGE = {"role": datasets.Value("string"), "content": datasets.Value("string")}
FEATURES = datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.List(MESSAGE)})
WORDS = "red green blue yellow circle square triangle diamond one two three four".split()


def _records(folder: Path, count: int = 12) -> list[dict]:
    """Messages-form records with two images, one image or none (every third of each), images as files."""
    records = []
    for i in range(count):
        names = []
        for k in range((2, 1, 0)[i % 3]):
            name = f"{i}_{k}.png"
            Image.new("RGB", (56 + 28 * k, 56), (20 * i, 200 - 60 * k, 90)).save(folder / name)
            names.append(name)
        question = "".join("<image>" for _ in names) + f"Describe picture {i}."
        answer = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 5))
        records.append({"images": names, "messages": [{"role": "user", "content": question},
                                                      {"role": "assistant", "content": answer}]})
    return records


def _table(records: list[dict], folder: Path, corrupt: int | None = None):
    """The records with their images embedded as bytes (datasets.Image columns); record `corrupt`'s first image
    replaced by bytes that are no image."""
    rows = []
    for i, record in enumerate(records):
        images = [{"bytes": (folder / name).read_bytes(), "path": None} for name in record["images"]]
        if i == corrupt:
            images[0] = {"bytes": b"\x89PNG\r\n\x1a\n not really", "path": None}
        rows.append({"images": images, "messages": record["messages"]})
    return datasets.Dataset.from_list(rows, features=FEATURES)


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    records = _records(folder)
    (folder / "train.json").write_text(json.dumps(records))
    _table(records, folder).to_parquet(str(folder / "train.parquet"))
    _table(records, folder).save_to_disk(str(folder / "saved"))
    # a Parquet file with one corrupt embedded image more (record 12): skipped, it leaves the same samples
    _table(records + _records(folder, 13)[12:], folder, corrupt=12).to_parquet(str(folder / "bad.parquet"))
    return folder


def _settings(path, on_bad_record: str = "error") -> DataSettings:
    cfg = compose_cfg(["data=conversations", f"data.path={path}", f"data.on_bad_record={on_bad_record}"])
    return data_settings(cfg.data)


def test_tables_give_the_json_samples_and_split(forms, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(forms / "cache"))
    assert is_table(forms / "train.parquet") and is_table(forms / "saved") and not is_table(forms / "train.json")
    json_train, json_val, _ = build_datasets(_settings(forms / "train.json"), seed=3)
    for name in ("train.parquet", "saved"):
        train, val, stats = build_datasets(_settings(forms / name), seed=3)
        assert isinstance(train, TableConversations) and stats["skipped_bad_records"] == 0
        assert isinstance(train.table, StreamRows)  # rows read from their record batch (datasets' files)
        for ours, theirs in ((train, json_train), (val, json_val)):
            assert len(ours) == len(theirs) and list(ours.lengths()) == list(theirs.lengths())
            for i in range(len(ours)):
                a, b = ours[i], theirs[i]
                assert a.messages == b.messages and a.meta == b.meta and len(a.images) == len(b.images)
                assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    # the held rows are integers, not records; a data worker gets those and the table's file names
    assert train.rows.dtype == np.int64 and not hasattr(train, "records")
    import pickle

    shipped = pickle.dumps(train)
    assert pickle.loads(shipped)[3].messages == train[3].messages
    assert len(shipped) < 20_000  # 9 records: small arrays and the files' names; no image bytes
    # a table whose rows are not plain batches of its files is read through datasets' own Dataset: the same rows
    through_datasets = pickle.loads(pickle.dumps(DatasetRows(str(forms / "saved"))))
    assert all(through_datasets.row(i) == train.table.row(i) for i in (0, 5, 11))


def test_a_corrupt_embedded_image_is_named_before_weights_load_and_skip_counts_it(forms, tmp_path, monkeypatch):
    import vlm_finetune.train as train_module

    monkeypatch.setenv("HF_DATASETS_CACHE", str(forms / "cache"))

    def no_weights(*args, **kwargs):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(train_module, "_model_builder", no_weights)
    cfg = compose_cfg(COMMON + ["model=tiny_glm41v", f"data.path={forms / 'bad.parquet'}"], tmp_path)
    with pytest.raises(DataError, match=r"bad.parquet: record 12 embedded image 0 is corrupt or not an image.*"
                                        r"on_bad_record=skip"):
        train_module.train(cfg)
    dataset, skipped = load_table(forms / "bad.parquet", None, on_bad_record="skip")
    assert skipped == 1 and len(dataset) == 12 and 12 not in dataset.rows.tolist()


def test_llava_form_with_one_image_column_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "a.png")
    table = datasets.Dataset.from_list([
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                             {"from": "gpt", "value": "dark"}]},
        {"image": None, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>x"},
                                                   {"from": "gpt", "value": "y"}]}])
    (tmp_path / "shards").mkdir()
    table.to_parquet(str(tmp_path / "shards" / "part-0.parquet"))
    with pytest.raises(DataError, match=r"shards: record 2 image .*missing.png does not exist"):
        load_table(tmp_path / "shards", tmp_path)
    dataset, skipped = load_table(tmp_path / "shards", tmp_path, on_bad_record="skip")
    assert skipped == 1 and len(dataset) == 2
    assert dataset[0].images[0].getpixel((0, 0)) == (1, 2, 3) and dataset[1].images == []
    assert [m.role for m in dataset[1].messages] == ["user", "assistant"]


def _run(forms: Path, data: str, run_dir: Path, extra: list[str] = ()):
    from vlm_finetune.train import train

    overrides = COMMON + ["model=tiny_glm41v", "precision=32-true", f"data.path={forms / data}",
                          "data.val_fraction=0.25", "data.micro_batch_size=2", "trainer.accumulate_grad_batches=2",
                          "data.group_by_length=true", "data.max_length=512", *extra]
    return train(compose_cfg(overrides, run_dir))


# 3 tiny runs (64 s on the shared 2 cores); the quick suite checks the samples equal (first test above)
@pytest.mark.slow
def test_parquet_and_saved_folder_train_the_json_adapter(forms, tmp_path, monkeypatch):
    """tiny_glm41v on records with two images, one image and none: the Parquet (with one corrupt record skipped)
    and the save_to_disk folder train the JSON file's adapter and losses."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(forms / "cache"))
    runs = {}
    for name, data, extra in (("json", "train.json", []), ("parquet", "bad.parquet", ["data.on_bad_record=skip"]),
                              ("saved", "saved", [])):
        metrics, _ = _run(forms, data, tmp_path / name, extra)
        runs[name] = (tmp_path / name, metrics)
    reference = _adapter(runs["json"][0])
    assert reference and len(_losses(runs["json"][0])) == 3
    for name in ("parquet", "saved"):
        run_dir, metrics = runs[name]
        assert _losses(run_dir) == pytest.approx(_losses(runs["json"][0]), abs=1e-6)
        adapter = _adapter(run_dir)
        assert adapter.keys() == reference.keys()
        for key in reference:
            assert (adapter[key] - reference[key]).abs().max().item() <= 1e-6, (name, key)
    assert runs["parquet"][1]["skipped_bad_records"] == 1 and runs["saved"][1]["skipped_bad_records"] == 0


@pytest.mark.parametrize("model, name", [("tiny_glm4v", "GLM-4V-9B")])  # MGM takes several (test_mgm_templates.py)
def test_one_image_families_refuse_two_image_records_before_weights_load(forms, tmp_path, monkeypatch, model, name):
    import vlm_finetune.train as train_module

    def no_weights(*args, **kwargs):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(train_module, "_model_builder", no_weights)
    cfg = compose_cfg(COMMON + [f"model={model}", f"data.path={forms / 'train.json'}", "data.val_fraction=0.25"],
                      tmp_path)
    # records 0, 3, 6 and 9 hold two images; record 0 falls in the held-out split (seed 0), the rest train
    with pytest.raises(DataError, match=rf"train.json: {name} takes at most 1 image\(s\) per conversation; "
                                        r"3 record\(s\) hold more \(record 3, 6, 9\).*on_bad_record=skip"):
        train_module.train(cfg)


def _resident_kib(path: str) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            current = len(fields) > 5 and fields[5] == path
        elif current and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads /proc/self/smaps (Linux)")
def test_a_row_is_read_from_its_own_record_batch_without_the_rest_of_the_file(tmp_path):
    """datasets writes its Arrow files in small record batches; opening one with datasets reads every batch's
    header, which (with the kernel's fault-around) maps the whole file into the process. StreamRows reads the
    batch that holds the row and nothing else."""
    import gc
    import pickle

    import pyarrow as pa

    from vlm_finetune.data.arrow_rows import index_stream, stream_files

    rows = [{"images": [{"bytes": bytes([i % 251]) * 1500, "path": None}], "messages": [{"role": "user",
             "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3000)]
    table = pa.Table.from_pylist(rows, schema=FEATURES.arrow_schema)
    path = str(tmp_path / "rows.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=20):  # 150 batches of ~30 KiB
            writer.write_batch(batch)
    dataset = datasets.Dataset.from_file(path).with_format("arrow")
    assert stream_files(dataset) == [path]
    assert stream_files(datasets.Dataset.from_list(rows[:3])) is None  # held in memory: no file to read
    assert stream_files(dataset.select([2, 0])) is None  # an indices mapping: rows are not the file's order
    expected = {i: dataset[i].to_pylist()[0] for i in (0, 1234, 2999)}
    index = index_stream([path], len(dataset))
    del dataset
    gc.collect()  # datasets' mapping goes
    assert len(index.offset) == 150 and index.start[-1] == 3000 and _resident_kib(path) == 0
    size_kib = Path(path).stat().st_size // 1024
    reader = pickle.loads(pickle.dumps(StreamRows(index)))  # what a data worker gets
    for i, row in expected.items():
        assert reader.row(i) == row == rows[i]
    assert 0 < _resident_kib(path) < 0.1 * size_kib, (_resident_kib(path), size_kib)
