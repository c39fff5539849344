"""CT-CHAT VQA files (mv3dtk.vqa.data): the synthetic dataset's own files read; every malformed file or
item is a ConfigError naming the file, the item and the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mv3dtk.data.synth import make_synthetic_dataset
from mv3dtk.errors import ConfigError
from mv3dtk.vqa.data import keep_prepped, read_vqa, split_of, volume_id_of, vqa_files

GOOD = {"id": "train_1_a_1_qa", "image": "train_1_a_1.nii.gz", "conversations": [
    {"from": "human", "value": "<image>\nIs there atelectasis? <short_answer>", "type": "short_answer"},
    {"from": "gpt", "value": "Yes."},
    {"from": "human", "value": "Describe the lungs. <long_answer>", "type": "free_response"},
    {"from": "gpt", "value": "Band-like atelectasis in the right lower lobe."}]}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=3, n_valid=2, shape=(16, 16, 16), seed=0)


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_the_synthetic_datasets_vqa_files_read(synth):
    files = vqa_files(synth.root)
    assert [f.name for f in files] == ["train_vqa.json", "valid_vqa.json"]
    assert [split_of(f) for f in files] == ["train", "valid"]
    for f, split in zip(files, ("train", "valid")):
        items = read_vqa(f)
        raw = json.loads(f.read_text(encoding="utf-8"))
        assert len(items) == 2 * synth.n_volumes[split]  # a conversation and a report per volume
        assert [{k: v for k, v in it.items() if k != "volume_id"} for it in items] == raw
        assert all(it["volume_id"] == it["image"].removesuffix(".nii.gz") for it in items)
        assert {it["volume_id"].split("_")[0] for it in items} == {split}
    assert vqa_files(files[0]) == [files[0]]


def test_keep_prepped_keeps_items_of_known_volumes_and_counts_the_rest(synth):
    items = read_vqa(vqa_files(synth.root)[0])
    ids = sorted({it["volume_id"] for it in items})
    kept, skipped = keep_prepped(items, ids[:1])
    assert {it["volume_id"] for it in kept} == {ids[0]} and len(kept) == 2
    assert skipped == len(items) - 2
    assert keep_prepped(items, []) == ([], len(items))
    assert keep_prepped(iter(items), iter(ids)) == (items, 0)


@pytest.mark.parametrize("image, volume_id", [
    ("train_1_a_1.nii.gz", "train_1_a_1"), ("valid_2_b_1.nii", "valid_2_b_1"), ("train_3_a_2.npz", "train_3_a_2"),
    ("some/folder/train_4_a_1.npy", "train_4_a_1"), ("C:\\data\\valid_5_a_1.nii.gz", "valid_5_a_1"),
    ("train_6_a_1", "train_6_a_1"),
])
def test_volume_id_drops_folder_and_volume_suffix(image, volume_id):
    assert volume_id_of(image) == volume_id


def _broken(field_edit):
    item = copy.deepcopy(GOOD)
    field_edit(item)
    return item


def _set(path, value):
    def edit(item):
        target = item
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


MALFORMED = {
    "not an object": (["oops"], "must be an object"),
    "no image": (_broken(_set(["image"], KeyError)), "field \"image\""),
    "image not a string": (_broken(_set(["image"], 7)), "field \"image\""),
    "empty image": (_broken(_set(["image"], " ")), "field \"image\""),
    "no conversations": (_broken(_set(["conversations"], KeyError)), "field \"conversations\""),
    "empty conversations": (_broken(_set(["conversations"], [])), "field \"conversations\""),
    "gpt first": (_broken(_set(["conversations", 0, "from"], "gpt")), "conversations\\[0\\].from must be \"human\""),
    "two questions in a row": (_broken(_set(["conversations", 1, "from"], "human")),
                               "conversations\\[1\\].from must be \"gpt\""),
    "turn not an object": (_broken(_set(["conversations", 2], "text")), "conversations\\[2\\].from"),
    "value not a string": (_broken(_set(["conversations", 3, "value"], None)),
                           "conversations\\[3\\].value must be a string"),
    "no answer": (_broken(lambda it: it["conversations"].__delitem__(slice(1, None))), "needs an answer"),
    "no image token": (_broken(_set(["conversations", 0, "value"], "Is there atelectasis?")), "found in no turn"),
    "image token twice": (_broken(_set(["conversations", 2, "value"], "<image> again")),
                          "found in conversations\\[0\\], conversations\\[2\\]"),
    "image token in an answer": (_broken(lambda it: (it["conversations"][0].update(value="Q?"),
                                                     it["conversations"][1].update(value="<image>"))),
                                 "found in conversations\\[1\\]"),
    "image token twice in one turn": (_broken(_set(["conversations", 0, "value"], "<image><image> Q?")),
                                      "more than once"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_item_names_file_index_and_field(tmp_path, case):
    bad, field = MALFORMED[case]
    if isinstance(bad, list):  # the item itself is replaced
        bad = bad[0]
    path = write(tmp_path / "train_vqa.json", [GOOD, bad, GOOD])
    with pytest.raises(ConfigError, match=f"item 1\\b.*{field}") as e:
        read_vqa(path)
    assert str(e.value).startswith(f"{path}: item 1")
    if isinstance(bad, dict) and "id" in bad:
        assert "(id 'train_1_a_1_qa')" in str(e.value)


@pytest.mark.parametrize("text, match", [
    ("[{\"image\": 1,", "not valid JSON \\(.* at line 1, column"),
    ("{\"items\": []}", "must hold a JSON list of items"),
    ("", "not valid JSON"),
])
def test_a_malformed_file_is_named(tmp_path, text, match):
    path = write(tmp_path / "valid_vqa.json", text)
    with pytest.raises(ConfigError, match=match) as e:
        read_vqa(path)
    assert str(path) in str(e.value)


def test_a_file_that_is_not_utf8_or_absent_is_named(tmp_path):
    path = tmp_path / "train_vqa.json"
    path.write_bytes(b"[\xff\xfe]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_vqa(path)
    with pytest.raises(ConfigError, match="cannot read the VQA file .*missing.json"):
        read_vqa(tmp_path / "missing.json")


def test_an_empty_list_reads_as_no_items(tmp_path):
    assert read_vqa(write(tmp_path / "x.json", [])) == []


def test_vqa_files_finds_a_file_a_ctrate_root_or_a_folder_of_json(tmp_path):
    root = tmp_path / "root"
    (root / "dataset" / "vqa").mkdir(parents=True)
    train = write(root / "dataset" / "vqa" / "train_vqa.json", [GOOD])
    write(root / "dataset" / "vqa" / "notes.json", [])  # not *_vqa.json: not a VQA file of the root
    write(root / "meta.json", {})
    assert vqa_files(root) == [train]
    folder = tmp_path / "folder"
    folder.mkdir()
    files = [write(folder / name, [GOOD]) for name in ("b.json", "a.json")]
    (folder / "readme.txt").write_text("x")
    assert vqa_files(folder) == sorted(files)
    odd = write(tmp_path / "conversations.jsonish", [GOOD])
    assert vqa_files(str(odd)) == [odd]


def test_vqa_files_without_any_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no VQA file found .*dataset/vqa/\\*_vqa.json"):
        vqa_files(tmp_path)
    with pytest.raises(ConfigError, match="no such file or folder"):
        vqa_files(tmp_path / "nowhere")


@pytest.mark.parametrize("name, split", [
    ("train_vqa.json", "train"), ("valid_vqa.json", "valid"), ("Validation.json", "valid"), ("val-set.json", "valid"),
    ("train.json", "train"), ("vqa_train.json", None), ("trainee_vqa.json", None), ("test_vqa.json", None),
    ("conversations.json", None),
])
def test_split_of_reads_the_file_name(name, split):
    assert split_of(Path("some", "dir", name)) == split
