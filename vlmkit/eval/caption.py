"""Captioning: COCO and Flickr30K from Karpathy's split files (or COCO's own captions file), scored with CIDEr
(CIDEr-D, as `pycocoevalcap` computes it, after its PTB tokenizer), reported x 100 as papers report it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vlmkit.eval.data import DataError, Sample, field_of, find_file, image_path, read_json

CAPTION_LAYOUT = """  coco/                               (Flickr30K: dataset_flickr30k.json and flickr30k-images/)
    dataset_coco.json                 Karpathy's split file: {"images": [{"filepath", "filename", "split", "cocoid", "sentences": [{"raw"}]}]}
    val2014/COCO_val2014_000000391895.jpg   (<filepath>/<filename>; or --images DIR)
  or COCO's own captions_val2014.json:     {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}"""


def read_captions(
    data: Path, images: Path | None = None, task: str = "coco", split: str = "test"
) -> list[Sample]:
    """One sample per picture of the split (Karpathy's "test" by default; COCO's own file has no split),
    its reference captions as the target."""
    path = find_file(
        data,
        ("dataset_coco.json", "dataset_flickr30k.json", "dataset_*.json", "captions_*.json"),
        task,
        CAPTION_LAYOUT,
    )
    raw = read_json(path, task, CAPTION_LAYOUT)
    root = images or path.parent
    entries = field_of(raw, "images", str(path), task)
    samples = []
    if "annotations" in raw:  # COCO's captions file
        refs: dict[Any, list[str]] = {}
        for a in raw["annotations"]:
            refs.setdefault(field_of(a, "image_id", f"{path} annotation", task), []).append(a["caption"])
        for entry in entries:
            image_id = field_of(entry, "id", f"{path} image", task)
            name = field_of(entry, "file_name", f"{path} image {image_id}", task)
            if image_id not in refs:
                raise DataError(f"{task}: image {image_id} of {path} has no caption annotations")
            folder = name.split("_")[1] if name.count("_") >= 2 else ""
            samples.append(
                caption_sample(str(image_id), image_path(root, [f"{folder}/{name}", name]), refs[image_id])
            )
        return samples
    for entry in entries:
        if entry.get("split", split) != split:
            continue
        name = field_of(entry, "filename", f"{path} image", task)
        where = f"{path} image {name}"
        refs_ = [field_of(s, "raw", where, task) for s in field_of(entry, "sentences", where, task)]
        if not refs_:
            raise DataError(f"{task}: {where} has no reference sentences")
        image_id = entry.get("cocoid", entry.get("imgid", Path(name).stem))
        candidates = [f"{entry['filepath']}/{name}"] if entry.get("filepath") else []
        candidates += [f"flickr30k-images/{name}", f"images/{name}", name]
        samples.append(caption_sample(str(image_id), image_path(root, candidates), refs_))
    if not samples:
        raise DataError(f"{task}: {path} has no pictures of split {split!r}")
    return samples


def caption_sample(image_id: str, picture: Path, references: list[str]) -> Sample:
    return Sample(id=image_id, images=[picture], question="", target=references, answer=references[0])


def cider_scores(references: list[list[str]], predictions: list[str]) -> tuple[float, list[float]]:
    """CIDEr-D of each prediction against its references (IDF over these references), and their mean, both
    as pycocoevalcap gives them (not x 100). Needs Java for the PTB tokenizer, as the COCO evaluation does."""
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise ImportError("CIDEr needs pycocoevalcap: pip install 'vlmkit[eval]'") from None
    if shutil.which("java") is None:
        raise RuntimeError(
            "CIDEr tokenizes captions with the Stanford PTB tokenizer, which needs Java: install a JRE "
            "(apt-get install default-jre-headless) and run again"
        )
    if not predictions:
        return 0.0, []
    keys = [str(i) for i in range(len(predictions))]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(
        {k: [{"caption": r} for r in refs] for k, refs in zip(keys, references, strict=True)}
    )
    # an empty line would shift the tokenizer's output lines: empty answers are scored as empty
    spoken = {k: [{"caption": p}] for k, p in zip(keys, predictions, strict=True) if p.strip()}
    res = tokenizer.tokenize(spoken) if spoken else {}
    res = {k: res.get(k, [""]) for k in keys}
    mean, each = Cider().compute_score(gts, res)
    return float(mean), [float(x) for x in each]


def score_captions(samples: list[Sample], outputs: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    mean, each = cider_scores([s.target for s in samples], outputs)
    return {"cider": 100 * mean}, [{"score": 100 * x} for x in each]
