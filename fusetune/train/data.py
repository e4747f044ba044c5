"""Loading chat samples: the demo set, a JSONL file, a folder of images with a JSONL, or `datasets`.

Every source yields the same sample shape, the common ``messages`` format::

    {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "images/0001.png"},
                                     {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle ..."}]}]}

``content`` may also be a plain string. Images are given in place (``"image"``: a path relative
to the JSONL file's folder, an absolute path, or a PIL image or encoded image in a `datasets` row,
which stays in the data set's table until a batch opens it: ``StoredImage``), or, TRL-style,
as ``{"type": "image"}`` placeholders filled in order from the row's ``"images"`` list; a row
whose messages have no placeholder at all gets its images at the start of its first user turn (as
TRL does), and images left over after the placeholders are an error. Image files are checked to
exist when the data set loads, and opened by the collator.

A ``.jsonl`` file holds one JSON object a line; a ``.json`` file, a list of such objects (or a
``.jsonl`` under that name).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from fusetune.train.errors import FusetuneError

ROLES = ("system", "user", "assistant")
SAMPLE_HELP = (
    'each sample needs {"messages": [{"role": "user", "content": ...}, '
    '{"role": "assistant", "content": ...}]}'
)


class ChatDataset:
    """A list of normalised samples as a map-style data set (what Trainer takes)."""

    def __init__(self, samples: list[dict[str, Any]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (or of a ``.json`` file holding one list of them), each with its
    ``_source`` for error messages. Lines end at ``\n`` only: JSON strings may hold U+2028 and
    the like, which ``str.splitlines`` would cut at; a byte-order mark is skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise FusetuneError(f"cannot read data file {str(path)!r}: {error}") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _read_json_list(path, text)
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            where = f"{path.name} line {number}"
            rows.append(_sourced(_parsed(line, where), where))
    return rows


def _read_json_list(path: Path, text: str) -> list[dict[str, Any]]:
    """The rows of a ``.json`` file holding one list of samples."""
    return [_sourced(row, f"{path.name} item {index}") for index, row in enumerate(_parsed(text, path.name))]


def _parsed(text: str, where: str) -> Any:
    """``text`` as JSON; where it is not, an error naming ``where`` (a file, or a line of one)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise FusetuneError(f"{where} is not valid JSON ({error.msg}); fix or remove it.") from None


def _sourced(row: Any, source: str) -> dict[str, Any]:
    """``row`` with its ``_source``; a row that is not a JSON object is an error naming it."""
    if not isinstance(row, dict):
        raise FusetuneError(f"{source} is not a JSON object: {SAMPLE_HELP}.")
    return row | {"_source": source}


def _find_jsonl(folder: Path) -> Path:
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FusetuneError(
            f"data folder {str(folder)!r} has no .jsonl file of chat messages; put one there "
            f"(e.g. data.jsonl, "
            f"{SAMPLE_HELP}, image paths relative to the folder)."
        )
    if len(files) == 1:
        return files[0]
    for name in ("data.jsonl", "train.jsonl", "metadata.jsonl"):
        if (folder / name).is_file():
            return folder / name
    names = ", ".join(f.name for f in files)
    raise FusetuneError(
        f"data folder {str(folder)!r} has several .jsonl files ({names}); name the one to use as dataset."
    )


def _load_datasets(name: str, split: str, from_disk: bool) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise FusetuneError(
            f"dataset {name!r} is neither a local .jsonl file nor a folder, and the `datasets` "
            f"package is not "
            f"installed to load it by name: pip install datasets, or give a local .jsonl file."
        ) from None
    try:
        if from_disk:
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise FusetuneError(
                        f"dataset {name!r} has no split {split!r}; it has {', '.join(loaded)}."
                    )
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(name, split=split)
    except FusetuneError:
        raise
    except Exception as error:  # noqa: BLE001 - any loader failure becomes one clear message
        raise FusetuneError(
            f"could not load dataset {name!r} (split {split!r}): {type(error).__name__}: "
            f"{str(error)[:300]}. Check "
            f"the name and split, or give a local .jsonl file or a folder of images with a .jsonl."
        ) from None
    return _stored_rows(loaded, Path(name).name)


def _stored_rows(dataset, name: str) -> list[dict[str, Any]]:
    """The rows of a `datasets` data set as stored, each with its ``_source``, every encoded image in
    them replaced by a ``StoredImage``: its bytes stay in the data set's (memory-mapped) table until
    the collator opens it for a batch. Rows read the plain way decode every image of the set into
    memory as it loads (60 images of 1000 x 1000 pixels took 228 MiB); rows holding the bytes keep
    every image of the set in memory, encoded."""
    table = dataset.with_format("arrow")
    rows = []
    for batch in table.iter(batch_size=1024):
        for row in batch.to_pylist():
            index = len(rows)
            rows.append(_with_stored_images(row, table, index, ()) | {"_source": f"{name} row {index}"})
    return rows


def _with_stored_images(value: Any, table, row: int, where: tuple) -> Any:
    """``value`` (a row, or a part of one at ``where``) with each encoded image (`datasets`' Image
    feature as stored: ``{"bytes": ..., "path": ...}``) replaced by a ``StoredImage``."""
    if isinstance(value, dict):
        if isinstance(value.get("bytes"), bytes) and set(value) <= {"bytes", "path"}:
            return StoredImage(table, row, where)
        return {key: _with_stored_images(item, table, row, (*where, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_stored_images(item, table, row, (*where, i)) for i, item in enumerate(value)]
    return value


class StoredImage:
    """An encoded image in a row of a `datasets` table, read from the table when opened."""

    def __init__(self, table, row: int, where: tuple):
        self.table, self.row, self.where = table, row, where

    def read_bytes(self) -> bytes:
        """The image's encoded bytes (one row of the table read)."""
        value = self.table[self.row].to_pylist()[0]
        for key in self.where:
            value = value[key]
        return value["bytes"]

    def __repr__(self) -> str:
        return f"StoredImage(row {self.row}, {'/'.join(map(str, self.where))})"


def _normalise(row: Any, index: int, root: Path | None) -> dict[str, Any]:
    source = row.get("_source", f"sample {index}") if isinstance(row, dict) else f"sample {index}"
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise FusetuneError(f"{source} has no 'messages' list: {SAMPLE_HELP}.")
    extra_images = _row_images(row, source)
    messages = []
    for message in row["messages"]:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise FusetuneError(
                f"{source}: a message has no role among {', '.join(ROLES)}: {str(message)[:120]}."
            )
        parts = _parts(message.get("content"), extra_images, root, source)
        messages.append({"role": message["role"], "content": parts})
    if extra_images:
        _place_left_over_images(messages, extra_images, root, source)
    answered = any(message["role"] == "assistant" and
                   any(p["type"] == "text" and p["text"].strip() for p in message["content"])
                   for message in messages)
    if not answered:
        raise FusetuneError(
            f"{source} has no assistant answer to learn from (every label would be masked): add an "
            f'{{"role": "assistant", "content": "..."}} message with text.'
        )
    return {"messages": messages, "_source": source}


def _row_images(row: dict, source: str) -> list:
    """The row's TRL-style ``images`` list (a lone path or image counts as a list of one)."""
    images = row.get("images")
    if images is None:
        return []
    if isinstance(images, (str, Path, dict, StoredImage)) or hasattr(images, "convert"):
        return [images]
    if not isinstance(images, (list, tuple)):
        raise FusetuneError(f"{source}: 'images' must be a list of image paths, not {type(images).__name__}.")
    return list(images)


def _parts(content: Any, extra_images: list, root: Path | None, source: str) -> list[dict]:
    """A message's content as text and image parts; ``{"type": "image"}`` placeholders take the
    next of ``extra_images`` (the row's ``images``, consumed in order)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise FusetuneError(f"{source}: message content must be a string or a list of parts.")
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif isinstance(part, dict) and _part_type(part) == "image":
            image = part.get("image")
            if image is None:
                if not extra_images:
                    raise FusetuneError(
                        f"{source}: an image entry has no 'image' and the row's 'images' list has no more; "
                        f'give the path as {{"type": "image", "image": "path.png"}}.'
                    )
                image = extra_images.pop(0)
            parts.append({"type": "image", "image": _image_ref(image, root, source)})
        elif isinstance(part, dict) and _part_type(part) == "text":
            parts.append({"type": "text", "text": _text(part.get("text"), source)})
        else:
            raise FusetuneError(f"{source}: unsupported content part {str(part)[:120]}; use text or image.")
    return parts


def _text(value: Any, source: str) -> str:
    """A text part's ``text``: a string, a number written out, or nothing (None: "")."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise FusetuneError(f"{source}: a text part's 'text' is a {type(value).__name__}, not a string: "
                        f"{str(value)[:80]}.")


def _place_left_over_images(messages: list[dict], images: list, root: Path | None, source: str) -> None:
    """A row's ``images`` that no placeholder took: at the start of the first user turn where the
    messages have no image at all (TRL's layout: plain string content plus an images list), else an
    error (an image left out silently would train on text alone)."""
    if any(part["type"] == "image" for message in messages for part in message["content"]):
        raise FusetuneError(
            f"{source}: the row's 'images' list has {len(images)} more image(s) than its messages have "
            f'{{"type": "image"}} entries; add an entry where each goes, or drop the extra images.'
        )
    first_user = next((message for message in messages if message["role"] == "user"), None)
    if first_user is None:
        raise FusetuneError(f"{source}: the row has images but no user message to put them in.")
    placed = [{"type": "image", "image": _image_ref(image, root, source)} for image in images]
    first_user["content"][:0] = placed


def _part_type(part: dict) -> str | None:
    """A content part's ``type``; without one, "image" when it holds an image.

    An ``"image": null`` does not make a part an image: `datasets` writes every key of the parts'
    common schema into each part, so a text part reads ``{"type": "text", "image": null, ...}``.
    """
    return part.get("type") or ("image" if part.get("image") is not None else None)


def _image_ref(image: Any, root: Path | None, source: str) -> Any:
    """What the collator opens: an image file's path, encoded image bytes (checked to be an image,
    decoded only when a batch needs them) or a PIL image."""
    if isinstance(image, StoredImage) or isinstance(image, dict) and image.get("bytes") is not None:
        import io

        from PIL import Image

        encoded = image.read_bytes() if isinstance(image, StoredImage) else image["bytes"]
        try:
            Image.open(io.BytesIO(encoded)).close()
        except (Image.UnidentifiedImageError, OSError) as error:
            raise FusetuneError(
                f"{source}: its image bytes cannot be read ({type(error).__name__}: {error}); fix or "
                "remove the sample."
            ) from None
        return image if isinstance(image, StoredImage) else encoded
    if isinstance(image, dict) and image.get("path"):
        image = image["path"]
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            base = f"the folder {str(root)!r}" if root is not None else "the working directory"
            raise FusetuneError(
                f"{source}: image {str(image)!r} not found (looked for {str(path)!r}); fix the path "
                f"(relative paths are read from {base}) or remove the sample."
            )
        return str(path)
    if hasattr(image, "convert"):  # a PIL image
        return image
    raise FusetuneError(f"{source}: unsupported image value of type {type(image).__name__}; give a path.")


# Names ending so are files, never `datasets` hub names (a missing one is not looked up on the Hub).
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt")


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(_FILE_SUFFIXES) or spec.startswith((".", "/", "~"))


def source_kind(spec: str) -> str:
    """What a ``dataset`` value names: "demo", "file" (a .jsonl file), "folder" (of images with a
    .jsonl file), "saved Dataset" or "saved DatasetDict" (folders written by `datasets`'
    save_to_disk), "hub" (a `datasets` name) or "missing" (a path that does not exist)."""
    if spec == "demo":
        return "demo"
    path = Path(spec).expanduser()
    if path.is_file():
        return "file"
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return "saved DatasetDict"
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "saved Dataset"
        return "folder"
    return "missing" if _looks_like_path(spec) else "hub"


def _rows(spec: str, split: str, demo_samples: int, seed: int) -> tuple[list[Any], Path | None]:
    kind, path = source_kind(spec), Path(spec).expanduser()
    if kind == "demo":
        from fusetune.train import demo

        return demo.samples(demo_samples, seed=seed), None
    if kind == "file":
        if path.suffix.lower() not in (".jsonl", ".json"):
            raise FusetuneError(
                f"dataset file {spec!r} is not a .jsonl file of chat messages ({SAMPLE_HELP})."
            )
        return _read_jsonl(path), path.parent
    if kind in ("saved Dataset", "saved DatasetDict"):
        return _load_datasets(str(path), split, from_disk=True), path
    if kind == "folder":
        jsonl = _find_jsonl(path)
        return _read_jsonl(jsonl), jsonl.parent
    if kind == "missing":
        raise FusetuneError(
            f"dataset {spec!r} not found; give an existing .jsonl file, a folder, or a `datasets` name."
        )
    return _load_datasets(spec, split, from_disk=False), None


def load_samples(spec: str, split: str = "train", demo_samples: int = 1000, seed: int = 0) -> list[dict]:
    """Normalised samples of one source (see the module docstring); an empty source is an error."""
    rows, root = _rows(spec, split, demo_samples, seed)
    if not rows:
        raise FusetuneError(f"dataset {spec!r} is empty: it has no samples ({SAMPLE_HELP}).")
    return [_normalise(row, i, root) for i, row in enumerate(rows)]


def held_out_samples(config) -> list[dict]:
    """The samples of a string ``eval_split``: the path of a second source, or a split of the
    training source, which must then be a `datasets` one with named splits (anything else would
    hold out the training set itself)."""
    held, dataset = config.eval_split, config.dataset
    kind = source_kind(dataset)
    path = Path(held).expanduser()
    if path.exists():
        if kind != "demo" and path.resolve() == Path(dataset).expanduser().resolve():
            raise FusetuneError(
                f"eval_split {held!r} is the training dataset itself; give another source, or a "
                f"fraction (0.05)."
            )
        return load_samples(held, config.dataset_split, config.demo_samples, config.seed)
    if _looks_like_path(held) or "/" in held:
        raise FusetuneError(
            f"eval_split {held!r} not found; give an existing .jsonl file or folder, a fraction (0.05), "
            f"or a split name of a `datasets` dataset."
        )
    if kind not in ("hub", "saved DatasetDict"):
        raise FusetuneError(
            f"eval_split {held!r} is a split name, but dataset {dataset!r} ({kind}) has no splits; give a "
            f"fraction (0.05) or the path of a held-out .jsonl file."
        )
    if held == config.dataset_split:
        raise FusetuneError(
            f"eval_split {held!r} is the training split (dataset_split) itself; name another split of "
            f"{dataset!r}, or give a fraction (0.05)."
        )
    return load_samples(dataset, held, config.demo_samples, config.seed)


def load_splits(config) -> tuple[ChatDataset, ChatDataset | None]:
    """The training set and the held-out set (``eval_split``: a fraction, a path or a split name)."""
    samples = load_samples(config.dataset, config.dataset_split, config.demo_samples, config.seed)
    held = config.eval_split
    if isinstance(held, str):
        if held.lower() in ("", "none", "0"):
            return ChatDataset(samples), None
        return ChatDataset(samples), ChatDataset(held_out_samples(config))
    if held <= 0:
        return ChatDataset(samples), None
    count = max(1, round(len(samples) * held))
    if count >= len(samples):
        raise FusetuneError(
            f"eval_split={held} leaves no training samples out of {len(samples)}; "
            f"lower eval_split or add data."
        )
    order = list(range(len(samples)))
    random.Random(config.seed).shuffle(order)
    evaluation = [samples[i] for i in order[:count]]
    train = [samples[i] for i in order[count:]]
    return ChatDataset(train), ChatDataset(evaluation)
