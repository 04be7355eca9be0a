"""Dataset loaders (COCO, VOC, split files, NUS-WIDE) and download helpers, on fixtures built in tmp_path."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clml_core.data import load_coco, load_nuswide, load_split_file, load_voc
from clml_core.data.download import (
    COCO_ARCHIVES,
    coco_archives,
    download_url,
    extract_zip,
    extraction_marker,
    file_md5,
    partial_path,
)
from clml_core.data.nuswide import NUS_WIDE_CONCEPTS
from clml_core.data.splitfile import read_split_file, write_split_file
from clml_core.data.voc import VOC_CLASSES

# --- COCO ------------------------------------------------------------------------------------------------

# Sparse ids listed out of order, as a check that columns follow the category id.
COCO_CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _coco_root(tmp_path: Path, write_image, split: str = "train2014", annotations=None, images=None) -> Path:
    prefix = f"COCO_{split}_" if split.endswith("2014") else ""
    images = images or [{"id": i, "file_name": f"{prefix}{i:012d}.jpg"} for i in (7, 3, 11, 5)]
    if annotations is None:
        annotations = [
            {"image_id": 7, "category_id": 1},
            {"image_id": 7, "category_id": 1},  # a second person: still one label
            {"image_id": 7, "category_id": 90, "iscrowd": 1},
            {"image_id": 3, "category_id": 3},
            {"image_id": 5, "category_id": 90},
        ]  # image 11 has no annotation
    (tmp_path / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
    (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    for k, img in enumerate(images):
        write_image(tmp_path / split / img["file_name"], seed=k)
    return tmp_path


@pytest.mark.parametrize("split", ["train2014", "val2017"])
def test_coco_labels_classes_and_drop_policy(tmp_path, write_image, split):
    root = _coco_root(tmp_path, write_image, split)
    ds = load_coco(root, split)
    assert ds.classes == ["person", "car", "toothbrush"]  # category-id order
    assert [p.name for p in ds.image_paths] == [
        f"{'COCO_' + split + '_' if split.endswith('2014') else ''}{i:012d}.jpg" for i in (7, 3, 5)
    ]
    np.testing.assert_array_equal(ds.labels, [[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(ds.observed, ds.labels)
    assert ds.name == f"coco/{split}"
    image, target, _ = ds[1]
    assert image.shape == (3, 12, 16) and target.tolist() == [0.0, 1.0, 0.0]


def test_coco_keep_policy_adds_all_negative_rows(tmp_path, write_image):
    ds = load_coco(_coco_root(tmp_path, write_image), "train2014", empty_images="keep")
    assert len(ds) == 4
    np.testing.assert_array_equal(ds.labels, [[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="empty_images must be one of"):
        load_coco(tmp_path, "train2014", empty_images="zero")


def test_coco_is_lazy_about_images(tmp_path, write_image):
    root = _coco_root(tmp_path, write_image)
    (root / "train2014" / "COCO_train2014_000000000003.jpg").unlink()
    ds = load_coco(root, "train2014")  # loading does not open images
    with pytest.raises(FileNotFoundError, match="COCO_train2014_000000000003.jpg"):
        ds[1]


def test_coco_missing_annotation_file_lists_what_is_there(tmp_path, write_image):
    root = _coco_root(tmp_path / "coco", write_image, "val2017")
    with pytest.raises(FileNotFoundError, match=r"instances_val2014\.json.*found there: \['instances_val2017.json'\]"):
        load_coco(root, "val2014")
    with pytest.raises(FileNotFoundError, match="expected the official layout"):
        load_coco(tmp_path / "elsewhere", "val2017")
    with pytest.raises(FileNotFoundError, match="looks like the annotations folder itself; pass its parent"):
        load_coco(root / "annotations", "val2017")
    with pytest.raises(FileNotFoundError, match=rf"one level down; pass root={root}"):
        load_coco(tmp_path, "val2017")


def test_coco_missing_image_folder(tmp_path, write_image):
    root = _coco_root(tmp_path, write_image)
    (root / "train2014").rename(root / "pictures")
    with pytest.raises(FileNotFoundError, match=r"COCO image folder not found: .*train2014 \(annotations"):
        load_coco(root, "train2014")
    (root / "images").mkdir()
    (root / "pictures").rename(root / "images" / "train2014")
    with pytest.raises(FileNotFoundError, match=r"images found in .*images/train2014 \(a YOLO-style layout\)"):
        load_coco(root, "train2014")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.pop("categories"), r"instances_train2014\.json: the top level has no 'categories' key"),
        (lambda d: d["images"][1].pop("file_name"), r"images\[1\] has no 'file_name' key"),
        (lambda d: d["annotations"][2].pop("category_id"), r"annotations\[2\] has no 'category_id' key"),
        (lambda d: d["categories"][0].pop("name"), r"categories\[0\] has no 'name' key"),
        (lambda d: d["annotations"].append({"image_id": 99, "category_id": 1}), "unknown image id 99"),
        (lambda d: d["annotations"].append({"image_id": 7, "category_id": 2}), "unknown category id 2"),
        (lambda d: d["images"].append({"id": 7, "file_name": "x.jpg"}), "repeats image id 7"),
        (lambda d: d.update(annotations=[]), "no image has an annotation"),
        (lambda d: d.update(images=[], annotations=[]), "'images' is empty"),
    ],
)
def test_coco_malformed_annotations_name_file_and_key(tmp_path, write_image, edit, match):
    root = _coco_root(tmp_path, write_image)
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_coco(root, "train2014")


def test_coco_invalid_json(tmp_path, write_image):
    root = _coco_root(tmp_path, write_image)
    (root / "annotations" / "instances_train2014.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"instances_train2014\.json: not valid JSON"):
        load_coco(root, "train2014")


# --- VOC -------------------------------------------------------------------------------------------------

VOC_IDS = ["000005", "000007", "000009"]


def _voc_root(tmp_path: Path, write_image, split: str = "trainval") -> Path:
    base = tmp_path / "VOCdevkit" / "VOC2007"
    main = base / "ImageSets" / "Main"
    main.mkdir(parents=True)
    # class k: image 0 positive iff k even, image 1 difficult iff k == 3, image 2 positive iff k == 14 (person)
    for k, cls in enumerate(VOC_CLASSES):
        values = [1 if k % 2 == 0 else -1, 0 if k == 3 else -1, 1 if k == 14 else -1]
        # VOC pads single-digit labels with two spaces
        lines = [f"{i} {v:2d}" for i, v in zip(VOC_IDS, values)]
        (main / f"{cls}_{split}.txt").write_text("\n".join(lines) + "\n")
    for k, image_id in enumerate(VOC_IDS):
        write_image(base / "JPEGImages" / f"{image_id}.jpg", seed=k)
    return tmp_path


def test_voc_labels_and_difficult_policy(tmp_path, write_image):
    root = _voc_root(tmp_path, write_image)
    ds = load_voc(root)
    assert ds.classes == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert [p.name for p in ds.image_paths] == [f"{i}.jpg" for i in VOC_IDS]
    expected = np.zeros((3, 20), dtype=np.uint8)
    expected[0, ::2] = 1
    expected[2, 14] = 1
    np.testing.assert_array_equal(ds.labels, expected)
    expected[1, 3] = 1
    np.testing.assert_array_equal(load_voc(root, difficult_as_positive=True).labels, expected)
    assert ds[0][0].shape == (3, 12, 16) and ds.name == "voc2007/trainval"


@pytest.mark.parametrize(
    "content,match",
    [
        ("000005 1\n000007 2\n000009 -1\n", r"aeroplane_trainval\.txt:2: expected '<image id> <-1\|0\|1>'"),
        ("000005 1\n000007\n000009 -1\n", r"aeroplane_trainval\.txt:2:"),
        ("000005 1\n000007 -1 x\n000009 -1\n", r"aeroplane_trainval\.txt:2:"),
        ("000005 1\n000005 -1\n000009 -1\n", r"aeroplane_trainval\.txt:2: image id '000005' listed twice"),
        ("\n\n", r"aeroplane_trainval\.txt lists no image"),
    ],
)
def test_voc_malformed_line_names_file_and_line(tmp_path, write_image, content, match):
    root = _voc_root(tmp_path, write_image)
    (root / "VOCdevkit/VOC2007/ImageSets/Main/aeroplane_trainval.txt").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_voc(root)


def test_voc_inconsistent_ids_across_class_files(tmp_path, write_image):
    root = _voc_root(tmp_path, write_image)
    (root / "VOCdevkit/VOC2007/ImageSets/Main/dog_trainval.txt").write_text("000005 1\n000007 -1\n000010 -1\n")
    with pytest.raises(ValueError, match=r"dog_trainval\.txt does not list the same image ids.*'000009'.*'000010'"):
        load_voc(root)


def test_voc_missing_files(tmp_path, write_image):
    root = _voc_root(tmp_path, write_image)
    with pytest.raises(FileNotFoundError, match=r"aeroplane_test\.txt"):
        load_voc(root, split="test")
    with pytest.raises(FileNotFoundError, match="VOCdevkit/VOC2012/ImageSets/Main"):
        load_voc(root, year="2012")
    (root / "VOCdevkit/VOC2007/JPEGImages").rename(root / "VOCdevkit/VOC2007/images")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        load_voc(root)


# --- split files -----------------------------------------------------------------------------------------


def test_split_file_parses_the_authors_format(tmp_path, write_image):
    (tmp_path / "split.txt").write_text("COCO_a.jpg,0\nCOCO_b.jpg, 8 41\n\nCOCO_c.jpg,2 2 79\r\nCOCO_d.jpg,  5\n")
    for name in "abcd":
        write_image(tmp_path / "images" / f"COCO_{name}.jpg")
    ds = load_split_file(tmp_path / "split.txt", tmp_path / "images", 80)
    assert [p.name for p in ds.image_paths] == ["COCO_a.jpg", "COCO_b.jpg", "COCO_c.jpg", "COCO_d.jpg"]
    expected = np.zeros((4, 80), dtype=np.uint8)
    expected[0, 0] = expected[1, [8, 41]] = expected[2, [2, 79]] = expected[3, 5] = 1
    np.testing.assert_array_equal(ds.labels, expected)
    assert ds.classes == [str(k) for k in range(80)] and ds.name == "split"
    assert ds[1][1].nonzero().flatten().tolist() == [8, 41]


@pytest.mark.parametrize(
    "content,lineno,match",
    [
        ("a.jpg,1\n0437_424259217.jpg,2.\n", 2, r"class index '2\.' of '0437_424259217\.jpg'"),
        ("a.jpg,1\nb.jpg,3 80\n", 2, r"class index 80 of 'b\.jpg' is out of range for 80 classes"),
        ("a.jpg,-1\n", 1, "class index '-1'"),
        ("a.jpg 1 2\n", 1, "expected 'file_name,idx idx ...'"),
        (",1 2\n", 1, "expected 'file_name,idx idx ...'"),
        ("a.jpg,1\n\nb.jpg,\n", 3, r"'b\.jpg' lists no class index; pass allow_empty=True"),
    ],
)
def test_split_file_errors_name_file_and_line(tmp_path, content, lineno, match):
    path = tmp_path / "nus_train.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"nus_train\.txt:{lineno}: {match}"):
        read_split_file(path, 80)


def test_split_file_empty_rows_only_when_allowed(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("a.jpg,\nb.jpg, 3\n")
    names, labels = read_split_file(path, 4, allow_empty=True)
    assert names == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(labels, [[0, 0, 0, 0], [0, 0, 0, 1]])


def test_split_file_empty_or_missing(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.txt holds no image lines"):
        read_split_file(tmp_path / "empty.txt", 80)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_split_file(tmp_path / "nope.txt", 80)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_split_file(tmp_path / "empty.txt", tmp_path / "no_images", 80)


def test_split_file_class_names(tmp_path):
    (tmp_path / "s.txt").write_text("a.jpg,1\n")
    ds = load_split_file(tmp_path / "s.txt", tmp_path, 2, classes=["x", "y"], name="mine")
    assert ds.classes == ["x", "y"] and ds.name == "mine"
    with pytest.raises(ValueError, match="classes has 3 names but num_classes is 2"):
        load_split_file(tmp_path / "s.txt", tmp_path, 2, classes=["x", "y", "z"])


def test_split_file_write_read_round_trip(tmp_path):
    labels = (np.random.default_rng(0).random((30, 7)) < 0.3).astype(np.uint8)
    names = [f"img,{k}.jpg" for k in range(30)]  # a comma in a name survives (the last comma splits)
    write_split_file(tmp_path / "s.txt", names, labels)
    read_names, read_labels = read_split_file(tmp_path / "s.txt", 7, allow_empty=True)
    assert read_names == names
    np.testing.assert_array_equal(read_labels, labels)
    with pytest.raises(ValueError, match=r"names\[0\] = ' a.jpg' cannot be stored"):
        write_split_file(tmp_path / "t.txt", [" a.jpg"], labels[:1])
    with pytest.raises(ValueError, match="names has 1 entries but labels has 30 rows"):
        write_split_file(tmp_path / "t.txt", ["a.jpg"], labels)


# --- NUS-WIDE --------------------------------------------------------------------------------------------


def test_nuswide_concepts_are_the_official_81():
    assert len(NUS_WIDE_CONCEPTS) == 81 and len(set(NUS_WIDE_CONCEPTS)) == 81
    assert list(NUS_WIDE_CONCEPTS) == sorted(NUS_WIDE_CONCEPTS)  # Concepts81.txt is alphabetical
    assert NUS_WIDE_CONCEPTS[42] == "person" and NUS_WIDE_CONCEPTS[55] == "sky"


def test_nuswide_split_relative_to_root_and_concepts_file(tmp_path, write_image):
    (tmp_path / "nus_val.txt").write_text("1_2_3_m.jpg,42 60 79\n4_5_6_m.jpg,1 11\n")
    write_image(tmp_path / "images" / "1_2_3_m.jpg")
    ds = load_nuswide(tmp_path, "nus_val.txt")
    assert ds.classes == list(NUS_WIDE_CONCEPTS) and ds.name == "nuswide/nus_val"
    assert ds.labels.sum(axis=1).tolist() == [3, 2] and ds.labels[0, 42] == 1
    assert ds[0][0].shape == (3, 12, 16)
    renamed = [f"concept_{k}" for k in range(81)]
    (tmp_path / "Concepts81.txt").write_text("\r\n".join(renamed) + "\r\n")
    assert load_nuswide(tmp_path, tmp_path / "nus_val.txt").classes == renamed
    (tmp_path / "Concepts81.txt").write_text("airport\nanimal\n")
    with pytest.raises(ValueError, match=r"Concepts81\.txt: expected 81 distinct concept names"):
        load_nuswide(tmp_path, "nus_val.txt")


def test_nuswide_malformed_author_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "nus_train.txt").write_text("1_2_3_m.jpg,42\n0437_424259217.jpg,2.\n")
    with pytest.raises(ValueError, match=r"nus_train\.txt:2: class index '2\.'"):
        load_nuswide(tmp_path, "nus_train.txt")


# --- downloads (no network: file:// and a local HTTP server) ---------------------------------------------


def test_coco_archive_table():
    names = [a.filename for a in coco_archives("2014")]
    assert names == ["train2014.zip", "val2014.zip", "annotations_trainval2014.zip"]
    assert [a.filename for a in coco_archives("2017", ["val"], annotations=False)] == ["val2017.zip"]
    for year in COCO_ARCHIVES.values():
        for archive in year.values():
            assert archive.url.startswith("http://images.cocodataset.org/") and len(archive.md5) == 32
    with pytest.raises(ValueError, match="COCO year must be one of"):
        coco_archives("2015")
    with pytest.raises(ValueError, match="COCO split must be 'train' or 'val'"):
        coco_archives("2014", ["test"])


def test_download_file_url_with_md5(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 40)
    dest = tmp_path / "out" / "copy.bin"
    assert download_url(source.as_uri(), dest, md5=file_md5(source), progress=False) == dest
    assert dest.read_bytes() == source.read_bytes() and not partial_path(dest).exists()
    assert download_url("file:///does/not/matter", dest, progress=False) == dest  # existing file is kept
    with pytest.raises(OSError, match="MD5 of .* expected 0{32}; the partial file was deleted"):
        download_url(source.as_uri(), tmp_path / "bad.bin", md5="0" * 32, progress=False)
    assert not (tmp_path / "bad.bin").exists() and not partial_path(tmp_path / "bad.bin").exists()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))
    ranges: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        start = 0
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        if header:
            start = int(header.removeprefix("bytes=").rstrip("-"))
            if start >= len(self.payload):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def range_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _RangeHandler.ranges = []
    yield f"http://127.0.0.1:{server.server_address[1]}/archive.zip"
    server.shutdown()
    server.server_close()


def test_download_resumes_a_partial_file(tmp_path, range_server):
    payload = _RangeHandler.payload
    dest = tmp_path / "archive.zip"
    partial_path(dest).write_bytes(payload[:1234])
    md5 = hashlib.md5(payload).hexdigest()
    download_url(range_server, dest, md5=md5, progress=False)
    assert _RangeHandler.ranges == ["bytes=1234-"]
    assert dest.read_bytes() == payload and not partial_path(dest).exists()
    # A complete .part left by an interrupted rename: the server answers 416 and the file is finished.
    dest2 = tmp_path / "again.zip"
    partial_path(dest2).write_bytes(payload)
    download_url(range_server, dest2, md5=md5, progress=False)
    assert dest2.read_bytes() == payload


class _IgnoresRangeHandler(_RangeHandler):
    """Answers every request with the whole payload (200), as a server without range support does."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).ranges.append(self.headers.get("Range"))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)


class _WrongRangeHandler(_RangeHandler):
    """Answers a range request with 206 but a range other than the one asked for."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes 0-{len(self.payload) - 1}/{len(self.payload)}")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)


def _serve(handler: type) -> tuple[http.server.HTTPServer, str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/archive.zip"


def test_download_restarts_when_the_server_ignores_the_range(tmp_path):
    payload = _RangeHandler.payload
    dest = tmp_path / "archive.zip"
    partial_path(dest).write_bytes(b"stale bytes that must not stay in front")
    _IgnoresRangeHandler.ranges = []
    server, url = _serve(_IgnoresRangeHandler)
    try:
        download_url(url, dest, md5=hashlib.md5(payload).hexdigest(), progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert _IgnoresRangeHandler.ranges == ["bytes=39-"]
    assert dest.read_bytes() == payload and not partial_path(dest).exists()


def test_download_refuses_a_range_other_than_the_one_asked_for(tmp_path):
    dest = tmp_path / "archive.zip"
    partial_path(dest).write_bytes(_RangeHandler.payload[:100])
    server, url = _serve(_WrongRangeHandler)
    try:
        with pytest.raises(OSError, match=r"asked for bytes from 100, server sent range 'bytes 0-4999/5000'"):
            download_url(url, dest, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert partial_path(dest).read_bytes() == _RangeHandler.payload[:100] and not dest.exists()


def test_extract_zip_once_and_refuses_escaping_members(tmp_path):
    archive = tmp_path / "train2014.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train2014/a.jpg", b"abc")
        zf.writestr("annotations/instances_train2014.json", b"{}")
    root = tmp_path / "coco"
    extract_zip(archive, root, progress=False)
    assert (root / "train2014" / "a.jpg").read_bytes() == b"abc"
    assert extraction_marker(archive, root).is_file()
    (root / "train2014" / "a.jpg").unlink()
    extract_zip(archive, root, progress=False)  # marked as done: not extracted again
    assert not (root / "train2014" / "a.jpg").exists()

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", b"x")
    with pytest.raises(ValueError, match="would be extracted outside"):
        extract_zip(evil, root, progress=False)
    assert not (tmp_path / "outside.txt").exists()


def test_loaded_datasets_collate(tmp_path, write_image):
    ds = load_coco(_coco_root(tmp_path, write_image), "train2014")
    images, targets, indices = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 3, 12, 16) and targets.shape == (3, 3) and indices.tolist() == [0, 1, 2]
