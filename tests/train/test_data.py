"""Data loading: JSONL files, folders of images, `datasets` folders, the demo set, bad input."""

from __future__ import annotations

import json

import pytest

from fusetune.train import demo
from fusetune.train.config import load_config
from fusetune.train.data import StoredImage, load_samples, load_splits
from fusetune.train.errors import FusetuneError


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_demo_samples_are_deterministic_and_varied():
    a, b = demo.samples(20, seed=3), demo.samples(20, seed=3)
    captions = [s["messages"][1]["content"][0]["text"] for s in a]
    assert captions == [s["messages"][1]["content"][0]["text"] for s in b]
    assert len(set(captions)) > 10
    assert all(c.split()[2] in demo.SHAPES and c.split()[1] in demo.COLOURS for c in captions)


def test_image_folder_with_jsonl(tmp_path):
    demo.write_dataset(tmp_path / "set", 5)
    samples = load_samples(str(tmp_path / "set"))
    assert len(samples) == 5
    image = samples[0]["messages"][0]["content"][0]["image"]
    assert image.endswith("00000.png") and (tmp_path / "set" / "images" / "00000.png").samefile(image)
    assert samples[0]["_source"] == "data.jsonl line 1"


def test_jsonl_file_string_content_and_trl_images(tmp_path):
    demo.write_dataset(tmp_path, 1)
    _write(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]},
                    {"role": "assistant", "content": "a shape"},
                ],
                "images": ["images/00000.png"],
            },
        ],
    )
    samples = load_samples(str(tmp_path / "chat.jsonl"))
    assert samples[0]["messages"][1]["content"] == [{"type": "text", "text": "hi"}]
    assert samples[1]["messages"][0]["content"][0]["image"].endswith("images/00000.png")


def test_datasets_saved_folder(tmp_path):
    datasets = pytest.importorskip("datasets")

    rows = {"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 3}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    assert len(load_samples(str(tmp_path / "saved"))) == 3


def test_eval_split_fraction():
    config = load_config(None, ["--demo_samples", "40", "--eval_split", "0.25"])
    train, held = load_splits(config)
    assert len(train) == 30 and len(held) == 10


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "is empty"),
        ([{"text": "no messages"}], "line 1 has no 'messages' list"),
        ([{"messages": [{"role": "user", "content": "only a question"}]}], "no assistant answer"),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            ],
            "image 'nope.png' not found",
        ),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "no role among"),
    ],
)
def test_bad_data(tmp_path, rows, message):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FusetuneError, match=message):
        load_samples(str(path))


def test_bad_sources(tmp_path):
    with pytest.raises(FusetuneError, match="not found"):
        load_samples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FusetuneError, match="dataset 'data/train.parquet' not found"):
        load_samples("data/train.parquet")  # a file name, not a hub name to look up
    (tmp_path / "empty").mkdir()
    with pytest.raises(FusetuneError, match="no .jsonl file"):
        load_samples(str(tmp_path / "empty"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(FusetuneError, match="line 1 is not valid JSON"):
        load_samples(str(tmp_path / "bad.jsonl"))


def _splits(*argv):
    return load_splits(load_config(None, ["--eval_split", "0", *argv]))


def test_eval_split_never_falls_back_to_the_training_set(tmp_path):
    demo.write_dataset(tmp_path / "set", 6)
    data = str(tmp_path / "set" / "data.jsonl")
    for argv, message in (
        (
            ["--dataset", data, "--eval_split", "validation"],
            r"'validation' is a split name.*\(file\) has no splits",
        ),
        (["--dataset", str(tmp_path / "set"), "--eval_split", "test"], r"'test' is a split name.*\(folder\)"),
        (["--eval_split", "validation"], r"'validation' is a split name, but dataset 'demo' \(demo\)"),
        (
            ["--dataset", data, "--eval_split", str(tmp_path / "val.jsonl")],
            r"eval_split '.*val.jsonl' not found",
        ),
        (["--dataset", data, "--eval_split", "data/val"], "eval_split 'data/val' not found"),
        (["--dataset", data, "--eval_split", data], "is the training dataset itself"),
    ):
        with pytest.raises(FusetuneError, match=message):
            _splits(*argv)
    demo.write_dataset(tmp_path / "val", 2, seed=1)
    train, held = _splits("--dataset", data, "--eval_split", str(tmp_path / "val" / "data.jsonl"))
    assert len(train) == 6 and len(held) == 2


def test_eval_split_names_a_split_of_a_saved_datasetdict(tmp_path):
    datasets = pytest.importorskip("datasets")

    def rows(answer, count):
        chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]
        return datasets.Dataset.from_dict({"messages": [chat] * count})

    datasets.DatasetDict({"train": rows("a", 3), "validation": rows("b", 2)}).save_to_disk(
        str(tmp_path / "dd")
    )
    train, held = _splits("--dataset", str(tmp_path / "dd"), "--eval_split", "validation")
    assert len(train) == 3 and len(held) == 2
    assert held[0]["messages"][1]["content"] == [{"type": "text", "text": "b"}]
    with pytest.raises(FusetuneError, match="has no split 'test'; it has train, validation"):
        _splits("--dataset", str(tmp_path / "dd"), "--eval_split", "test")
    with pytest.raises(FusetuneError, match="'train' is the training split"):
        _splits("--dataset", str(tmp_path / "dd"), "--eval_split", "train")
    rows("a", 3).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(FusetuneError, match=r"\(saved Dataset\) has no splits"):
        _splits("--dataset", str(tmp_path / "one"), "--eval_split", "validation")


def test_parts_with_null_images_as_datasets_writes_them(tmp_path):
    """`datasets` gives every content part all the keys of their common schema: a text part has
    "image": None, an image part "text": None (save_to_disk and to_json alike)."""
    datasets = pytest.importorskip("datasets")

    demo.write_dataset(tmp_path, 1)
    image = str(tmp_path / "images" / "00000.png")
    user = [{"type": "image", "image": image}, {"type": "text", "text": "describe the image ."}]
    answer = [{"type": "text", "text": "a red circle ."}]
    table = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}]
    )
    assert table[0]["messages"][0]["content"][1]["image"] is None  # what the loader must cope with
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_json(str(tmp_path / "exported.jsonl"))
    for spec in (tmp_path / "saved", tmp_path / "exported.jsonl"):
        (sample,) = load_samples(str(spec))
        assert sample["messages"][0]["content"] == user and sample["messages"][1]["content"] == answer
    # TRL style as exported: an image placeholder with "image": null, filled from the row's images.
    _write(
        tmp_path / "trl.jsonl",
        [
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": None, "text": None},
                            {"type": "text", "image": None, "text": "what ?"},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "image": None, "text": "a shape"}]},
                ],
                "images": ["images/00000.png"],
            }
        ],
    )
    (sample,) = load_samples(str(tmp_path / "trl.jsonl"))
    assert sample["messages"][0]["content"] == [
        {"type": "image", "image": image},
        {"type": "text", "text": "what ?"},
    ]


def _chat(question="q", answer="a"):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_images_without_placeholders_go_to_the_first_user_turn_and_extras_are_refused(tmp_path):
    """TRL's layout (string content plus an "images" list) puts the images at the start of the first
    user turn; before, they were dropped and the model trained on text alone. Images left over after
    the placeholders are an error. A lone path counts as a list of one."""
    demo.write_dataset(tmp_path, 2)
    images = ["images/00000.png", "images/00001.png"]
    _write(tmp_path / "trl.jsonl", [{"messages": _chat(), "images": images},
                                    {"messages": _chat(), "images": images[0]}])
    first, lone = load_samples(str(tmp_path / "trl.jsonl"))
    parts = first["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert parts[0]["image"].endswith("00000.png") and parts[1]["image"].endswith("00001.png")
    assert [p["type"] for p in lone["messages"][0]["content"]] == ["image", "text"]
    placeholder = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                   {"role": "assistant", "content": "a"}]
    _write(tmp_path / "extra.jsonl", [{"messages": placeholder, "images": images}])
    with pytest.raises(FusetuneError, match="extra.jsonl line 1: the row's 'images' list has 1 more image"):
        load_samples(str(tmp_path / "extra.jsonl"))


@pytest.mark.parametrize(("text", "expected"), [(0, "0"), (2.5, "2.5"), (None, ""), ("x", "x")])
def test_text_values_are_kept_as_written(tmp_path, text, expected):
    """A number is written out (before, 0 became an empty string); None is no text."""
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]},
                        {"role": "assistant", "content": "a"}]}
    _write(tmp_path / "data.jsonl", [row])
    assert load_samples(str(tmp_path / "data.jsonl"))[0]["messages"][0]["content"][0]["text"] == expected


@pytest.mark.parametrize("text", [["a", "b"], {"k": 1}, True])
def test_text_values_that_are_not_text_are_refused(tmp_path, text):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]},
                        {"role": "assistant", "content": "a"}]}
    _write(tmp_path / "data.jsonl", [row])
    with pytest.raises(FusetuneError, match="line 1: a text part's 'text' is a"):
        load_samples(str(tmp_path / "data.jsonl"))


def test_jsonl_lines_end_at_newlines_only_and_a_bom_is_skipped(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 and U+0085 as they are; str.splitlines cut the
    line there. A byte-order mark at the start is skipped, as `datasets` skips it."""
    answer = "line\u2028separated\u0085answer"
    path = tmp_path / "data.jsonl"
    path.write_text("\ufeff" + "\n".join(json.dumps({"messages": _chat(answer=answer)}, ensure_ascii=False)
                                         for _ in range(2)) + "\r\n", encoding="utf-8")
    samples = load_samples(str(path))
    assert [s["messages"][1]["content"][0]["text"] for s in samples] == [answer, answer]
    assert samples[1]["_source"] == "data.jsonl line 2"


def test_a_json_file_holds_a_list_of_samples(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"messages": _chat(answer=str(i))} for i in range(3)], indent=2))
    samples = load_samples(str(path))
    assert [s["messages"][1]["content"][0]["text"] for s in samples] == ["0", "1", "2"]
    assert samples[2]["_source"] == "data.json item 2"


def test_a_line_that_is_not_an_object_is_named_by_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": _chat()}) + "\n\n" + json.dumps(["not", "a", "row"]) + "\n")
    with pytest.raises(FusetuneError, match="data.jsonl line 3 is not a JSON object"):
        load_samples(str(path))


def test_unreadable_image_bytes_name_their_row(tmp_path):
    datasets = pytest.importorskip("datasets")

    rows = {"messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]],
            "images": [[{"bytes": b"not an image", "path": None}]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(FusetuneError, match="saved row 0: its image bytes cannot be read"):
        load_samples(str(tmp_path / "saved"))


def test_images_of_a_datasets_source_stay_encoded_until_a_batch_needs_them(tmp_path):
    """A saved `datasets` set with images in its rows: the loaded samples hold no image, decoded or
    encoded (read the plain way, every image of the set was decoded into memory at once; then every
    image's bytes were held), only where each lies in the data set's table, and the collator's
    batch equals the one made from the decoded images themselves."""
    datasets = pytest.importorskip("datasets")
    import torch

    from fusetune.train.collator import ChatCollator

    originals = [s["messages"][0]["content"][0]["image"] for s in demo.samples(3, seed=1)]
    question = [{"type": "image"}, {"type": "text", "text": "what ?"}]
    rows = {"messages": [[{"role": "user", "content": question},
                          {"role": "assistant", "content": [{"type": "text", "text": "a shape"}]}]] * 3,
            "images": [[image] for image in originals]}
    datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image())).save_to_disk(
        str(tmp_path / "saved"))
    samples = load_samples(str(tmp_path / "saved"))
    assert all(isinstance(s["messages"][0]["content"][0]["image"], StoredImage) for s in samples)
    assert not _held_bytes(samples)
    decoded = [{**s, "messages": [{**s["messages"][0], "content": [{"type": "image", "image": image},
                                                                    *s["messages"][0]["content"][1:]]},
                                  s["messages"][1]]} for s, image in zip(samples, originals, strict=True)]
    collator = ChatCollator(demo.build_processor(), max_seq_length=512)
    batch, expected = collator(samples), collator(decoded)
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(batch[key], value, rtol=0, atol=0, msg=key)


def _held_bytes(value) -> list[bytes]:
    """Every ``bytes`` object held in ``value`` (nested dicts, lists and tuples)."""
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [held for item in value for held in _held_bytes(item)]
    return []


def test_stored_images_in_content_parts_and_lone_images(tmp_path):
    """Encoded images anywhere in a row (a content part's ``image``, a lone ``images`` value) are
    read from the table when opened: the same pixels as the files they were made from."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from fusetune.train.collator import open_image

    demo.write_dataset(tmp_path, 2)
    files = [tmp_path / "images" / f"{i:05d}.png" for i in range(2)]
    encoded = [{"bytes": path.read_bytes(), "path": None} for path in files]
    answer = {"role": "assistant", "content": [{"type": "text", "text": "a shape"}]}
    question = [{"type": "image", "image": encoded[0]}, {"type": "text", "text": "q"}]
    in_part = [{"role": "user", "content": question}, answer]
    datasets.Dataset.from_list([{"messages": in_part}]).save_to_disk(str(tmp_path / "parts"))
    lone = [{"messages": _chat(), "images": encoded[1]}]
    datasets.Dataset.from_list(lone).save_to_disk(str(tmp_path / "lone"))
    for folder, path in (("parts", files[0]), ("lone", files[1])):
        (sample,) = load_samples(str(tmp_path / folder))
        assert not _held_bytes(sample)
        image = sample["messages"][0]["content"][0]["image"]
        with Image.open(path) as expected:
            assert open_image(image, "t", 10**8).tobytes() == expected.convert("RGB").tobytes()
