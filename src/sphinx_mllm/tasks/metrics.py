"""Metrics over generated text: each takes what the model wrote and parses boxes/points where the task is
spatial (`sphinx_mllm.geometry` parsers, 0-1 padded-square frame).

Whole-file scoring (`score(task, predictions, references)`, also `sphinx-mllm eval score`) joins two JSONL
files on `"id"` (compared as strings; every reference needs exactly one prediction and no prediction may be
unknown). Predictions are always `{"id", "text": str}`; references hold the ground truth, a `box` being
`[x1, y1, x2, y2]` in PIXELS of the original `width` x `height` image:

| task              | reference fields                                                   | result keys      |
|-------------------|--------------------------------------------------------------------|------------------|
| vqa               | answers: [str] (VQAv2: the ten human answers)                      | accuracy         |
| gqa, relation     | answer: str (exact match after VQA normalisation)                  | accuracy         |
| rec               | width, height, box                                                 | accuracy         |
| detection, layout | image_id, width, height, category_id, category? (name),            | mAP, AP50, ...   |
|                   | boxes: [box], iscrowd?: [0/1 per box]                              |                  |
| keypoints         | image_id, width, height, keypoints: [x, y, v] * 17, bbox?: COCO    | AP, AP50, ...    |
|                   | [x, y, w, h], area?, iscrowd?                                      |                  |
| grounded_caption  | width, height, phrases: [{phrase, boxes: [box]}]                   | phrase_recall    |
| ocr               | width, height, words: [{text, box}]                                | word_recall      |
| docvqa            | answers: [str]                                                     | anls             |
| chartqa           | answer: str                                                        | relaxed_accuracy |
| caption           | captions: [str]                                                    | CIDEr            |

Detection/layout: one reference per (image, category) query ("Detect all {category}"), with every GT box
of that category in the image (possibly none). Keypoints: one reference per GT person, queried with its box.
Averages over items are plain means except recalls (phrases, words), which are pooled over the file.
Generated text has no confidence; where COCOeval needs one, see `detection_map` / `keypoint_map`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sphinx_mllm.geometry import (
    Box,
    Point,
    box_from_pixels,
    box_to_pixels,
    parse_boxes,
    parse_grounded,
    point_to_pixels,
    xyxy_to_coco_xywh,
)
from sphinx_mllm.tasks.spatial import COCO_KEYPOINT_NAMES
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

log = get_logger(__name__)

# ----------------------------------------------------------------------------- VQA normalisation
# Tables of the official VQA evaluation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py).

_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # what the official "(?!<=\d)(\.)(?!\d)" does


def _vqa_punctuation(text: str) -> str:
    """Official rule: a mark is deleted when it touches a space (or when the text has a digit,digit comma),
    otherwise replaced by a space; periods not followed by a digit are deleted."""
    out = text
    drop_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCT:
        if drop_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def vqa_normalize(text: str) -> str:
    """The official VQA answer normalisation: punctuation rules, lower case, number words to digits
    ("two" -> "2"), articles removed, contraction fixes ("dont" -> "don't"), single spaces."""
    text = _vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: the mean over the leave-one-out subsets of the answers of min(1, matches / 3).

    With ten answers of which k match: k=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0. Both sides go
    through `vqa_normalize` (the official script normalises only the prediction fully, because the
    annotation files hold normalised answers; the normalisation is a no-op on those). A single answer
    has no leave-one-out subset and is scored by exact match.
    """
    if not answers:
        raise SphinxError("vqa_accuracy needs at least one reference answer")
    pred = vqa_normalize(prediction)
    hits = [vqa_normalize(a) == pred for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(hits)


def exact_match(prediction: str, answer: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the (or one) normalised answer (GQA style), else 0.0."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    pred = vqa_normalize(prediction)
    return float(any(vqa_normalize(a) == pred for a in answers))


# ----------------------------------------------------------------------------- document / chart QA


def _levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question (DocVQA): the best over the answers of
    1 - NL when NL < threshold, else 0, where NL = edit distance / longer length after lower-casing and
    collapsing whitespace."""
    if not answers:
        raise SphinxError("anls needs at least one reference answer")
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for answer in answers:
        gold = " ".join(answer.lower().split())
        longest = max(len(pred), len(gold))
        nl = _levenshtein(pred, gold) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _to_number(text: str) -> float | None:
    text = text.strip()
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numbers ("12.5", "40%" = 0.4) count within `tolerance` relative error of
    the target; anything else needs a case-insensitive exact match. A target of 0 needs a prediction of 0."""
    pred, gold = _to_number(prediction), _to_number(target)
    if pred is not None and gold is not None:
        if gold == 0:
            return float(pred == 0)
        return float(abs(pred - gold) / abs(gold) <= tolerance)
    return float(prediction.strip().lower() == target.strip().lower())


# ----------------------------------------------------------------------------- REC, grounding, OCR


def rec_accuracy(predictions: Sequence[str | Box | None], gt_boxes: Sequence[Box], iou_threshold: float = 0.5) -> float:
    """Share of predictions whose box has IoU >= `iou_threshold` with its GT box. A text prediction counts
    by its first parsed box; text without a box (or None) is a miss."""
    if len(predictions) != len(gt_boxes):
        raise SphinxError(f"rec_accuracy: {len(predictions)} predictions for {len(gt_boxes)} GT boxes")
    if not gt_boxes:
        raise SphinxError("rec_accuracy needs at least one item")
    hits = 0
    for pred, gt in zip(predictions, gt_boxes):
        box = _first_box(pred)
        hits += box is not None and box.iou(gt) >= iou_threshold
    return hits / len(gt_boxes)


def _first_box(pred: str | Box | None) -> Box | None:
    if isinstance(pred, Box) or pred is None:
        return pred
    boxes = parse_boxes(pred)
    return boxes[0] if boxes else None


_WORD_EDGE = re.compile(r"^[^\w]+|[^\w]+$")


def _norm_phrase(text: str, drop_articles: bool = False) -> str:
    """Case-folded, single-spaced, without punctuation at either end (and without a/an/the if asked)."""
    words = _WORD_EDGE.sub("", " ".join(text.casefold().split())).split()
    if drop_articles:
        words = [w for w in words if w not in _ARTICLES]
    return " ".join(words)


def _phrase_matches(pred: str, gold: str) -> bool:
    """Either phrase is a run of whole words of the other ("horse" ~ "a brown horse", not "hat" ~ "that")."""
    if not pred or not gold:
        return False
    a, b = f" {pred} ", f" {gold} "
    return a in b or b in a


def _grounded_hits(
    pred_text: str, gt: Sequence[tuple[str, Sequence[Box]]], iou_threshold: float, frame: _Frame | None
) -> int:
    preds = [
        (_norm_phrase(g.phrase, drop_articles=True), [_fit(b, frame) for b in g.boxes])
        for g in parse_grounded(pred_text)
        if g.phrase and g.boxes
    ]
    hits = 0
    for phrase, gt_boxes in gt:
        gold = _norm_phrase(phrase, drop_articles=True)
        hits += any(
            _phrase_matches(p, gold) and any(b.iou(g) >= iou_threshold for b in boxes for g in gt_boxes)
            for p, boxes in preds
        )
    return hits


def grounded_caption_recall(
    pred_text: str, gt: Sequence[tuple[str, Sequence[Box]]], iou_threshold: float = 0.5
) -> float:
    """Phrase recall of a grounded caption: a GT phrase counts when a predicted `<p>phrase</p>` matching it
    (case-folded, articles and outer punctuation dropped, either one a run of whole words of the other) has a
    box with IoU >= `iou_threshold` with one of its GT boxes. A predicted phrase may serve several GT phrases."""
    if not gt:
        raise SphinxError("grounded_caption_recall needs at least one GT phrase")
    return _grounded_hits(pred_text, gt, iou_threshold, None) / len(gt)


def _ocr_hits(pred_text: str, gt_words: Sequence[tuple[str, Box]], iou_threshold: float, frame: _Frame | None) -> int:
    preds = [
        (_norm_phrase(g.phrase), _fit(g.boxes[0], frame)) for g in parse_grounded(pred_text) if g.phrase and g.boxes
    ]
    used = [False] * len(preds)
    hits = 0
    for word, gt_box in gt_words:
        gold = _norm_phrase(word)
        best, best_iou = -1, iou_threshold
        for i, (text, box) in enumerate(preds):
            iou = box.iou(gt_box)
            if not used[i] and text == gold and iou >= best_iou:
                best, best_iou = i, iou
        if best >= 0:
            used[best] = True
            hits += 1
    return hits


def ocr_word_recall(pred_text: str, gt_words: Sequence[tuple[str, Box]], iou_threshold: float = 0.5) -> float:
    """Word recall of text detection + recognition, output written `<p>word</p> [box]` per word.

    A GT word is recalled when a predicted word equal to it (case-folded, outer punctuation dropped) has
    its first box at IoU >= `iou_threshold`; matching is one-to-one, each GT word (in order) taking the
    unused equal prediction of highest IoU.
    """
    if not gt_words:
        raise SphinxError("ocr_word_recall needs at least one GT word")
    return _ocr_hits(pred_text, gt_words, iou_threshold, None) / len(gt_words)


# ----------------------------------------------------------------------------- COCO detection / keypoints

# Rank decay of the pseudo-confidence of boxes parsed from text (see detection_map).
RANK_DECAY = 1e-4


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pycocotools prints progress to stdout; library code must not."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _pycocotools() -> tuple[Any, Any]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # the optional "eval" extra
        raise SphinxError("COCO metrics need pycocotools: pip install 'sphinx-mllm[eval]'") from exc
    return COCO, COCOeval


def _coco_index(dataset: Mapping[str, Any]) -> Any:
    coco_cls, _ = _pycocotools()
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise SphinxError(f"COCO ground truth lacks a {key!r} list")
    coco = coco_cls()
    coco.dataset = copy.deepcopy(dict(dataset))  # COCOeval writes into annotations ("ignore")
    with _quiet():
        coco.createIndex()
    return coco


def _coco_eval(gt: Any, results: list[dict[str, Any]], iou_type: str, img_ids: Sequence[int]) -> list[float]:
    """COCOeval stats over `img_ids` (the images that were asked about); no result at all scores 0."""
    _, cocoeval_cls = _pycocotools()
    if results:
        with _quiet():
            dt = gt.loadRes(results)
    else:
        dt = _coco_index({"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                          "annotations": []})  # fmt: skip
    with _quiet():
        ev = cocoeval_cls(gt, dt, iou_type)
        ev.params.imgIds = sorted(set(img_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


_DET_KEYS = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100",
             "AR_small", "AR_medium", "AR_large")  # fmt: skip
_KPT_KEYS = ("AP", "AP50", "AP75", "AP_medium", "AP_large", "AR", "AR50", "AR75", "AR_medium", "AR_large")


def _image_sizes(gt: Any) -> dict[int, tuple[int, int]]:
    sizes = {}
    for img in gt.dataset["images"]:
        if "width" not in img or "height" not in img:
            raise SphinxError(f"COCO image {img.get('id')!r} lacks width/height")
        sizes[img["id"]] = (int(img["width"]), int(img["height"]))
    return sizes


def _category_id(pred: Mapping[str, Any], by_name: Mapping[str, int], known: set[int]) -> int:
    if "category_id" in pred:
        cid = pred["category_id"]
    elif "category" in pred:
        cid = by_name.get(str(pred["category"]).lower())
        if cid is None:
            raise SphinxError(f"unknown category {pred['category']!r}; known: {sorted(by_name)}")
    else:
        raise SphinxError("a detection prediction needs 'category_id' or 'category'")
    if cid not in known:
        raise SphinxError(f"category_id {cid!r} is not in the ground truth")
    return cid


def detection_map(predictions: Sequence[Mapping[str, Any]], gt_coco: Mapping[str, Any]) -> dict[str, float]:
    """COCO box mAP of boxes parsed from generated text.

    `predictions`: one per (image, category) query, `{"image_id", "category_id" | "category" (name),
    "text"}`; `gt_coco`: a COCO instances dict (images with width/height, annotations, categories).
    Boxes are parsed in the 0-1 frame and mapped to pixels with `box_to_pixels` (clipped to the image).
    Text carries no confidence, so the k-th box of a query (0-based, output order) gets the score
    1 - k * RANK_DECAY: COCOeval's ranking then follows the model's output order. Only the images named by
    the predictions are evaluated, over every GT category (so ask every category for each image); a GT
    object whose category was never asked counts as missed. Keys: mAP (0.50:0.95), AP50, AP75,
    AP_small/medium/large, AR1/10/100, AR_small/medium/large; -1 where COCOeval has nothing to average.
    """
    gt = _coco_index(gt_coco)
    sizes = _image_sizes(gt)
    by_name = {str(c["name"]).lower(): c["id"] for c in gt.dataset["categories"] if "name" in c}
    known = {c["id"] for c in gt.dataset["categories"]}
    results: list[dict[str, Any]] = []
    img_ids = []
    for pred in predictions:
        img_id = pred.get("image_id")
        if img_id not in sizes:
            raise SphinxError(f"prediction image_id {img_id!r} is not in the ground truth")
        img_ids.append(img_id)
        cid = _category_id(pred, by_name, known)
        width, height = sizes[img_id]
        for rank, box in enumerate(parse_boxes(str(pred.get("text", "")))):
            xywh = xyxy_to_coco_xywh(box_to_pixels(box, width, height))
            results.append({"image_id": img_id, "category_id": cid, "bbox": list(xywh),
                            "score": max(0.0, 1.0 - rank * RANK_DECAY)})  # fmt: skip
    if not img_ids:
        raise SphinxError("detection_map needs at least one prediction")
    return dict(zip(_DET_KEYS, _coco_eval(gt, results, "bbox", img_ids)))


def _norm_keypoint_name(text: str) -> str:
    return re.sub(r"[\s\-]+", "_", text.strip().lower())


def keypoints_from_text(text: str, width: int, height: int) -> list[float]:
    """COCO `[x, y, v] * 17` in pixels from `<p>name</p> [x,y] ...` (names as in COCO, spaces or `_`).
    Named points get v=2; missing ones (and unknown names) are x=y=v=0; the first mention of a name wins."""
    found: dict[str, Point] = {}
    for g in parse_grounded(text):
        name = _norm_keypoint_name(g.phrase or "")
        if name in COCO_KEYPOINT_NAMES and g.points and name not in found:
            found[name] = g.points[0]
    out: list[float] = []
    for name in COCO_KEYPOINT_NAMES:
        if name in found:
            out += [*point_to_pixels(found[name], width, height), 2.0]
        else:
            out += [0.0, 0.0, 0.0]
    return out


def keypoint_map(predictions: Sequence[Mapping[str, Any]], gt_coco: Mapping[str, Any]) -> dict[str, float]:
    """COCO keypoint AP (OKS) of people parsed from generated text.

    `predictions`: one per queried person, `{"image_id", "text"}`; `gt_coco`: a COCO person-keypoints dict.
    Each prediction becomes one person result (see `keypoints_from_text`) with score 1.0: the person box
    was given in the prompt, not detected. The category is the GT's "person" category (or its only one).
    Keys: AP (OKS 0.50:0.95), AP50, AP75, AP_medium, AP_large, AR, AR50, AR75, AR_medium, AR_large.
    """
    gt = _coco_index(gt_coco)
    sizes = _image_sizes(gt)
    cats = gt.dataset["categories"]
    people = [c["id"] for c in cats if c.get("name") == "person"] or [c["id"] for c in cats]
    if len(people) != 1:
        raise SphinxError("keypoint ground truth needs one 'person' category")
    results = []
    for pred in predictions:
        img_id = pred.get("image_id")
        if img_id not in sizes:
            raise SphinxError(f"prediction image_id {img_id!r} is not in the ground truth")
        kpts = keypoints_from_text(str(pred.get("text", "")), *sizes[img_id])
        results.append({"image_id": img_id, "category_id": people[0], "keypoints": kpts, "score": 1.0})
    if not results:
        raise SphinxError("keypoint_map needs at least one prediction")
    return dict(zip(_KPT_KEYS, _coco_eval(gt, results, "keypoints", [r["image_id"] for r in results])))


# ----------------------------------------------------------------------------- captions


def _caption_tokens(text: str) -> str:
    """Lower-cased words with punctuation removed: a Java-free stand-in for the PTB tokenizer of the COCO
    caption tools ("'s" is split off as PTB does); scores can differ from Java-tokenised ones slightly."""
    text = re.sub(r"(\w)'(\w)", r"\1 '\2", text.lower())
    return " ".join(re.sub(r"[^\w\s']|'(?!\w)", " ", text).split())


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap's scorer and scale; papers print it x100, 1.17 -> 117) of captions vs
    their references. Document frequencies come from these references, so score a whole split at once."""
    if len(predictions) != len(references) or not predictions:
        raise SphinxError(f"cider: {len(predictions)} predictions for {len(references)} reference sets")
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as exc:
        raise SphinxError("CIDEr needs pycocoevalcap: pip install 'sphinx-mllm[eval]'") from exc
    gts = {i: [_caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    if any(not refs for refs in gts.values()):
        raise SphinxError("cider: every prediction needs at least one reference caption")
    res = {i: [_caption_tokens(p)] for i, p in enumerate(predictions)}
    value, _ = Cider().compute_score(gts, res)
    return float(value)


# ----------------------------------------------------------------------------- whole files


class _Frame:
    """The image a reference is about: pixel boxes in, frame boxes (clipped to the image) out."""

    def __init__(self, ref: Mapping[str, Any]) -> None:
        width, height = _field(ref, "width"), _field(ref, "height")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (width, height)):
            raise SphinxError(f"reference {ref.get('id')!r}: width and height must be positive numbers")
        self.width, self.height = int(width), int(height)

    def box(self, xyxy: Any, what: str) -> Box:
        return box_from_pixels(_pixel_box(xyxy, what), self.width, self.height)


def _pixel_box(xyxy: Any, what: str) -> tuple[float, float, float, float]:
    """A GT pixel box `[x1, y1, x2, y2]` as floats with ordered corners."""
    if not isinstance(xyxy, Sequence) or len(xyxy) != 4:
        raise SphinxError(f"{what}: expected a pixel box [x1, y1, x2, y2], got {xyxy!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in xyxy)
    except (TypeError, ValueError):
        raise SphinxError(f"{what}: box values must be numbers, got {xyxy!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise SphinxError(f"{what}: box values must be finite, got {xyxy!r}")
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _fit(box: Box, frame: _Frame | None) -> Box:
    """A predicted box cut to the image (the padding of the square holds no pixels), as pixel metrics do."""
    if frame is None:
        return box
    return box_from_pixels(box_to_pixels(box, frame.width, frame.height), frame.width, frame.height)


def _field(ref: Mapping[str, Any], name: str) -> Any:
    if name not in ref:
        raise SphinxError(f"reference {ref.get('id')!r} lacks the field {name!r}")
    return ref[name]


def _list(ref: Mapping[str, Any], name: str) -> list[Any]:
    value = _field(ref, name)
    if not isinstance(value, list):
        raise SphinxError(f"reference {ref.get('id')!r}: {name!r} must be a list")
    return value


def _texts(ref: Mapping[str, Any], name: str) -> list[str]:
    value = _field(ref, name)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SphinxError(f"reference {ref.get('id')!r}: {name!r} must be a non-empty list of strings")
    return value


Pairs = Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _score_vqa(pairs: Pairs) -> dict[str, float]:
    return {"accuracy": _mean([vqa_accuracy(p["text"], _texts(r, "answers")) for p, r in pairs])}


def _score_exact(pairs: Pairs) -> dict[str, float]:
    return {"accuracy": _mean([exact_match(p["text"], str(_field(r, "answer"))) for p, r in pairs])}


def _score_rec(pairs: Pairs) -> dict[str, float]:
    preds, gts = [], []
    for p, r in pairs:
        frame = _Frame(r)
        box = _first_box(p["text"])
        preds.append(None if box is None else _fit(box, frame))
        gts.append(frame.box(_field(r, "box"), f"reference {r.get('id')!r} box"))
    return {"accuracy": rec_accuracy(preds, gts)}


def _score_grounded(pairs: Pairs) -> dict[str, float]:
    hits = total = 0
    for p, r in pairs:
        frame = _Frame(r)
        gt = []
        for item in _list(r, "phrases"):
            what = f"reference {r.get('id')!r} phrase"
            if not isinstance(item, Mapping) or "phrase" not in item or "boxes" not in item:
                raise SphinxError(f"{what}: expected {{'phrase': str, 'boxes': [[x1, y1, x2, y2], ...]}}")
            gt.append((str(item["phrase"]), [frame.box(b, what) for b in item["boxes"]]))
        hits += _grounded_hits(p["text"], gt, 0.5, frame)
        total += len(gt)
    if total == 0:
        raise SphinxError("grounded_caption references hold no phrase")
    return {"phrase_recall": hits / total}


def _score_ocr(pairs: Pairs) -> dict[str, float]:
    hits = total = 0
    for p, r in pairs:
        frame = _Frame(r)
        words = []
        for item in _list(r, "words"):
            what = f"reference {r.get('id')!r} word"
            if not isinstance(item, Mapping) or "text" not in item or "box" not in item:
                raise SphinxError(f"{what}: expected {{'text': str, 'box': [x1, y1, x2, y2]}}")
            words.append((str(item["text"]), frame.box(item["box"], what)))
        hits += _ocr_hits(p["text"], words, 0.5, frame)
        total += len(words)
    if total == 0:
        raise SphinxError("ocr references hold no word")
    return {"word_recall": hits / total}


def _score_anls(pairs: Pairs) -> dict[str, float]:
    return {"anls": _mean([anls(p["text"], _texts(r, "answers")) for p, r in pairs])}


def _score_chart(pairs: Pairs) -> dict[str, float]:
    return {"relaxed_accuracy": _mean([relaxed_accuracy(p["text"], str(_field(r, "answer"))) for p, r in pairs])}


def _score_caption(pairs: Pairs) -> dict[str, float]:
    return {"CIDEr": cider([p["text"] for p, _ in pairs], [_texts(r, "captions") for _, r in pairs])}


def _register_image(images: dict[Any, dict[str, Any]], ref: Mapping[str, Any]) -> Any:
    frame = _Frame(ref)
    img_id = _field(ref, "image_id")
    img = images.setdefault(img_id, {"id": img_id, "width": frame.width, "height": frame.height})
    if (img["width"], img["height"]) != (frame.width, frame.height):
        raise SphinxError(f"image {img_id!r} has two sizes in the references")
    return img_id


def _score_detection(pairs: Pairs) -> dict[str, float]:
    images: dict[Any, dict[str, Any]] = {}
    cats: dict[Any, dict[str, Any]] = {}
    anns: list[dict[str, Any]] = []
    preds, queries = [], set()
    for p, r in pairs:
        img_id = _register_image(images, r)
        cid = _field(r, "category_id")
        if (img_id, cid) in queries:
            raise SphinxError(f"two references ask for category {cid!r} in image {img_id!r}")
        queries.add((img_id, cid))
        cats.setdefault(cid, {"id": cid, "name": str(r.get("category", cid))})
        boxes = _list(r, "boxes")
        crowd = r.get("iscrowd") or [0] * len(boxes)
        if len(crowd) != len(boxes):
            raise SphinxError(f"reference {r.get('id')!r}: 'iscrowd' and 'boxes' differ in length")
        for xyxy, is_crowd in zip(boxes, crowd):
            x, y, w, h = xyxy_to_coco_xywh(_pixel_box(xyxy, f"reference {r.get('id')!r} box"))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cid, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(bool(is_crowd))})  # fmt: skip
        preds.append({"image_id": img_id, "category_id": cid, "text": p["text"]})
    gt = {"images": list(images.values()), "annotations": anns, "categories": list(cats.values())}
    return detection_map(preds, gt)


def _person_annotation(ref: Mapping[str, Any], img_id: Any, ann_id: int) -> dict[str, Any]:
    """A COCO person annotation from a keypoints reference (bbox: given or the labelled points' extent;
    area: given or the bbox's; give COCO's segment area for parity with published numbers)."""
    what = f"reference {ref.get('id')!r}"
    kpts = _list(ref, "keypoints")
    if len(kpts) != 3 * len(COCO_KEYPOINT_NAMES) or not all(isinstance(v, int | float) for v in kpts):
        raise SphinxError(f"{what}: 'keypoints' needs 51 numbers ([x, y, v] * 17)")
    bbox = ref.get("bbox") or _keypoint_extent(kpts)
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
        raise SphinxError(f"{what}: 'bbox' must be COCO [x, y, w, h], got {bbox!r}")
    area = ref.get("area", bbox[2] * bbox[3])
    if not isinstance(area, int | float):
        raise SphinxError(f"{what}: 'area' must be a number, got {area!r}")
    return {
        "id": ann_id, "image_id": img_id, "category_id": 1, "keypoints": [float(v) for v in kpts],
        "num_keypoints": sum(v > 0 for v in kpts[2::3]), "bbox": [float(v) for v in bbox],
        "area": float(area), "iscrowd": int(bool(ref.get("iscrowd", 0))),
    }  # fmt: skip


def _score_keypoints(pairs: Pairs) -> dict[str, float]:
    images: dict[Any, dict[str, Any]] = {}
    anns: list[dict[str, Any]] = []
    preds = []
    for p, r in pairs:
        img_id = _register_image(images, r)
        anns.append(_person_annotation(r, img_id, len(anns) + 1))
        preds.append({"image_id": img_id, "text": p["text"]})
    gt = {"images": list(images.values()), "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    return keypoint_map(preds, gt)


def _keypoint_extent(kpts: Sequence[float]) -> list[float]:
    """COCO xywh around the labelled keypoints (the GT box when a reference gives none)."""
    pts = [(kpts[i], kpts[i + 1]) for i in range(0, len(kpts), 3) if kpts[i + 2] > 0]
    if not pts:
        return [0.0, 0.0, 0.0, 0.0]
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


METRICS: dict[str, Callable[[Pairs], dict[str, float]]] = {
    "vqa": _score_vqa,
    "gqa": _score_exact,
    "relation": _score_exact,
    "rec": _score_rec,
    "detection": _score_detection,
    "layout": _score_detection,
    "keypoints": _score_keypoints,
    "grounded_caption": _score_grounded,
    "ocr": _score_ocr,
    "docvqa": _score_anls,
    "chartqa": _score_chart,
    "caption": _score_caption,
}
"""Task (metric key) -> scorer of (prediction, reference) pairs of a whole file (formats above)."""


def _by_id(rows: Sequence[Mapping[str, Any]], what: str) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, Mapping) or "id" not in row:
            raise SphinxError(f"{what} item {n} has no 'id'")
        key = str(row["id"])
        if key in out:
            raise SphinxError(f"{what} id {key!r} appears twice")
        out[key] = row
    return out


def _some(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:5])
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def score(
    task: str, predictions: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """The metric(s) of `task` over whole files (formats in the module docstring), joined on "id"."""
    if task not in METRICS:
        raise SphinxError(f"no metric for task {task!r}; known: {', '.join(sorted(METRICS))}")
    preds, refs = _by_id(predictions, "prediction"), _by_id(references, "reference")
    if not refs:
        raise SphinxError("no references to score")
    missing = [i for i in refs if i not in preds]
    if missing:
        raise SphinxError(f"{len(missing)} references have no prediction: {_some(missing)}")
    unknown = [i for i in preds if i not in refs]
    if unknown:
        raise SphinxError(f"{len(unknown)} predictions have no reference: {_some(unknown)}")
    for key, pred in preds.items():
        if not isinstance(pred.get("text"), str):
            raise SphinxError(f"prediction {key!r} has no string 'text'")
    pairs = [(preds[key], ref) for key, ref in refs.items()]
    result = METRICS[task](pairs)
    log.info("scored %d items of task %s: %s", len(pairs), task, result)
    return result
