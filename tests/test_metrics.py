"""Metrics of `sphinx_mllm.tasks.metrics` against hand-computed values and against pycocotools /
pycocoevalcap called directly on the same inputs."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import pytest

from sphinx_mllm.geometry import Box
from sphinx_mllm.tasks.metrics import (
    METRICS,
    anls,
    cider,
    detection_map,
    exact_match,
    grounded_caption_recall,
    keypoint_map,
    keypoints_from_text,
    ocr_word_recall,
    rec_accuracy,
    relaxed_accuracy,
    score,
    vqa_accuracy,
    vqa_normalize,
)
from sphinx_mllm.tasks.spatial import COCO_KEYPOINT_NAMES
from sphinx_mllm.utils.errors import SphinxError

# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),
        ("The dog.", "dog"),
        ("A red-white flag", "red white flag"),  # "-" not touching a space -> space
        ("yes, sir", "yes sir"),  # "," touching a space -> removed
        ("1,000 people", "1000 people"),  # digit,digit comma: every mark removed
        ("3.5", "3.5"),  # a period before a digit stays
        ("dont know", "don't know"),
        ("  none\tof  them\n", "0 of them"),
        ("What?!", "what"),
    ],
)
def test_vqa_normalize(raw: str, normalised: str) -> None:
    assert vqa_normalize(raw) == normalised


def test_vqa_normalize_is_idempotent_on_normalised_answers() -> None:
    for answer in ("2", "don't know", "red white flag", "3.5", "yes"):
        assert vqa_normalize(answer) == answer


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(k: int, expected: float) -> None:
    # k matching answers out of ten: the k subsets without a match see k-1, the others see k.
    # k=3: (3 * min(1, 2/3) + 7 * min(1, 3/3)) / 10 = 0.9.
    answers = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_accuracy("Yes.", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides() -> None:
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"]) == 1.0  # one answer: exact match
    with pytest.raises(SphinxError, match="at least one"):
        vqa_accuracy("x", [])


def test_exact_match() -> None:
    assert exact_match("The Table.", "table") == 1.0
    assert exact_match("chair", "table") == 0.0
    assert exact_match("sofa", ["couch", "sofa"]) == 1.0


# ----------------------------------------------------------------------------- ANLS, ChartQA


def test_anls() -> None:
    assert anls("hello", ["hallo"]) == pytest.approx(0.8)  # distance 1 / 5
    assert anls(" Hello  World ", ["hello world"]) == 1.0
    assert anls("ab", ["ac"]) == 0.0  # NL = 0.5 is not < 0.5
    assert anls("ab", ["ac"], threshold=0.6) == pytest.approx(0.5)
    assert anls("kitten", ["sitting", "kitte"]) == pytest.approx(1 - 1 / 6)  # best answer wins
    assert anls("", [""]) == 1.0


def test_relaxed_accuracy() -> None:
    assert relaxed_accuracy("105", "100") == 1.0
    assert relaxed_accuracy("105.1", "100") == 0.0
    assert relaxed_accuracy("41%", "0.4") == 1.0  # 0.41 vs 0.4: 2.5 %
    assert relaxed_accuracy("0", "0") == 1.0 and relaxed_accuracy("0.01", "0") == 0.0
    assert relaxed_accuracy(" Yes ", "yes") == 1.0
    assert relaxed_accuracy("Apple", "Apples") == 0.0


# ----------------------------------------------------------------------------- REC, grounding, OCR


def test_rec_accuracy() -> None:
    gts = [Box(0.0, 0.0, 0.5, 0.5)] * 4
    preds = [
        "It is at [0.00,0.00,0.50,0.50] and [0,0,1,1].",  # first box: IoU 1
        "[0,0,0.5,0.25]",  # IoU 0.125 / 0.25 = 0.5 exactly: counts (>=)
        "no box here",
        Box(0.6, 0.6, 0.9, 0.9),
    ]
    assert rec_accuracy(preds, gts) == pytest.approx(0.5)
    assert rec_accuracy([None], [gts[0]]) == 0.0
    with pytest.raises(SphinxError, match="predictions"):
        rec_accuracy(["x"], gts)


def test_grounded_caption_recall() -> None:
    man, horse, hat = Box(0.1, 0.1, 0.4, 0.9), Box(0.3, 0.4, 0.9, 0.9), Box(0.15, 0.05, 0.25, 0.12)
    gt = [("A man", [man]), ("a brown horse", [Box(0, 0, 0.05, 0.05), horse]), ("hat", [hat]), ("sky", [man])]
    text = (
        "<p>The man</p> [0.10,0.10,0.40,0.88] rides <p>horse</p> [0.30,0.40,0.90,0.90] "
        "<p>that</p> [0.15,0.05,0.25,0.12] under <p>sky</p> [0.6,0.6,0.7,0.7]"
    )
    # man: "the man" ~ "a man" once articles go, IoU 0.78/0.8 -> hit;
    # horse: a word run of "a brown horse", IoU 1 with its 2nd GT box -> hit;
    # hat: "that" is not the word "hat" -> miss; sky: box far away -> miss.
    assert grounded_caption_recall(text, gt) == pytest.approx(2 / 4)
    with pytest.raises(SphinxError):
        grounded_caption_recall(text, [])


def test_ocr_word_recall_is_one_to_one() -> None:
    b1, b2, b3 = Box(0.1, 0.1, 0.2, 0.15), Box(0.5, 0.1, 0.6, 0.15), Box(0.1, 0.8, 0.3, 0.9)
    gt = [("STOP", b1), ("stop", b2), ("Exit", b3), ("stop", b1)]
    text = "<p>stop</p> [0.10,0.10,0.20,0.15] <p>STOP.</p> [0.51,0.10,0.60,0.15] <p>exit</p> [0.5,0.5,0.6,0.6]"
    # STOP@b1 and stop@b2 recalled; exit box wrong; the second "stop"@b1 finds its prediction used.
    assert ocr_word_recall(text, gt) == pytest.approx(2 / 4)


# ----------------------------------------------------------------------------- COCO detection


def _quiet_cocoeval(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def _det_gt() -> dict[str, Any]:
    anns = [  # COCO xywh in pixels
        (1, 1, [64, 48, 256, 192]),  # frame (0.1, 0.2, 0.5, 0.5) on 640x480 (pad_y 80)
        (1, 1, [400, 300, 100, 100]),
        (1, 2, [0, 0, 100, 80]),
        (2, 2, [0, 0, 300, 500]),  # frame (0.2, 0, 0.8, 1) on 300x500 (pad_x 100)
    ]
    return {
        "images": [{"id": 1, "width": 640, "height": 480}, {"id": 2, "width": 300, "height": 500}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"id": i + 1, "image_id": img, "category_id": cat, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (img, cat, b) in enumerate(anns)
        ],
    }


def test_detection_map_matches_cocoeval_on_pixel_boxes() -> None:
    preds = [
        {"image_id": 1, "category": "dog", "text": "[0.10,0.20,0.50,0.50;0.60,0.60,0.78,0.75;0.9,0.9,1.0,1.0]"},
        {"image_id": 1, "category_id": 2, "text": "There is none."},
        {"image_id": 2, "category_id": 2, "text": "[0.2,0.0,0.8,1.0]"},
        {"image_id": 2, "category": "Dog", "text": "[0.3,0.3,0.4,0.4]"},
    ]
    # The same boxes in pixels, by hand (x = xn*S - pad_x, clipped to the image), scores by output rank.
    pixel_results = [
        {"image_id": 1, "category_id": 1, "bbox": [64, 48, 256, 192], "score": 1.0},
        {"image_id": 1, "category_id": 1, "bbox": [384, 304, 115.2, 96], "score": 0.9999},
        {"image_id": 1, "category_id": 1, "bbox": [576, 480, 64, 0], "score": 0.9998},  # all below the image
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 300, 500], "score": 1.0},
        {"image_id": 2, "category_id": 1, "bbox": [50, 150, 50, 50], "score": 1.0},
    ]
    got = detection_map(preds, _det_gt())
    expected = _quiet_cocoeval(_det_gt(), pixel_results, "bbox")
    assert list(got) == ["mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                         "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large"]  # fmt: skip
    assert list(got.values()) == pytest.approx(expected, abs=1e-6)
    assert 0.0 < got["mAP"] < 1.0


def test_detection_map_perfect_and_empty() -> None:
    perfect = [
        {"image_id": 1, "category_id": 1, "text": "[0.1,0.2,0.5,0.5;0.625,0.59375,0.78125,0.75]"},
        {"image_id": 1, "category_id": 2, "text": "[0.0,0.125,0.15625,0.25]"},
        {"image_id": 2, "category_id": 2, "text": "[0.2,0.0,0.8,1.0]"},
    ]
    assert detection_map(perfect, _det_gt())["mAP"] == pytest.approx(1.0)
    empty = [{"image_id": 1, "category_id": 1, "text": "nothing"}]
    assert detection_map(empty, _det_gt())["mAP"] == 0.0


def test_detection_rank_follows_output_order() -> None:
    gt = {
        "images": [{"id": 7, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cup"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                         "iscrowd": 0}],
    }  # fmt: skip
    tp, fp = "0.1,0.1,0.5,0.5", "0.6,0.6,0.9,0.9"
    # TP first: precision 1 at recall 1 -> AP 1. FP first: precision 0.5 at recall 1 -> AP 0.5.
    assert detection_map([{"image_id": 7, "category_id": 1, "text": f"[{tp};{fp}]"}], gt)["AP50"] == pytest.approx(1.0)
    assert detection_map([{"image_id": 7, "category_id": 1, "text": f"[{fp};{tp}]"}], gt)["AP50"] == pytest.approx(0.5)


def test_detection_map_leaves_the_ground_truth_alone() -> None:
    gt = _det_gt()
    detection_map([{"image_id": 1, "category_id": 1, "text": "[0.1,0.2,0.5,0.5]"}], gt)
    assert gt == _det_gt()  # COCOeval writes "ignore" into annotations: it must work on a copy


def test_detection_map_bad_input() -> None:
    with pytest.raises(SphinxError, match="image_id"):
        detection_map([{"image_id": 99, "category_id": 1, "text": ""}], _det_gt())
    with pytest.raises(SphinxError, match="unknown category"):
        detection_map([{"image_id": 1, "category": "horse", "text": ""}], _det_gt())
    with pytest.raises(SphinxError, match="annotations"):
        detection_map([{"image_id": 1, "category_id": 1, "text": ""}], {"images": [], "categories": []})


# ----------------------------------------------------------------------------- COCO keypoints


def _person_keypoints() -> list[float]:
    # Keypoint i at (20 + 8i, 10 + 4i) px of a 200 x 100 image (S = 200, pad_y = 50):
    # frame (0.10 + 0.04i, 0.30 + 0.02i), exact in two decimals.
    out: list[float] = []
    for i in range(17):
        out += [20 + 8 * i, 10 + 4 * i, 2]
    return out


def _kpt_gt() -> dict[str, Any]:
    return {
        "images": [{"id": 3, "width": 200, "height": 100}],
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO_KEYPOINT_NAMES)}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "keypoints": _person_keypoints(),
                         "num_keypoints": 17, "bbox": [20, 10, 128, 64], "area": 5000.0, "iscrowd": 0}],
    }  # fmt: skip


def _kpt_text(skip: tuple[str, ...] = (), dx: float = 0.0) -> str:
    parts = []
    for i, name in enumerate(COCO_KEYPOINT_NAMES):
        if name not in skip:
            parts.append(f"<p>{name.replace('_', ' ')}</p> [{0.10 + 0.04 * i + dx:.2f},{0.30 + 0.02 * i:.2f}]")
    return " ".join(parts)


def test_keypoints_from_text() -> None:
    kpts = keypoints_from_text("<p>nose</p> [0.10,0.30] <p>left eye</p> [0.5,0.5] <p>nose</p> [0.9,0.9]", 200, 100)
    assert len(kpts) == 51
    assert kpts[:6] == pytest.approx([20, 10, 2, 100, 50, 2])  # first "nose" wins
    assert kpts[6:] == [0.0] * 45


def test_keypoint_map_perfect_and_against_cocoeval() -> None:
    assert keypoint_map([{"image_id": 3, "text": _kpt_text()}], _kpt_gt())["AP"] == pytest.approx(1.0)
    text = _kpt_text(skip=("left_ankle", "right_ankle"), dx=0.01)
    kpts = []
    for i, name in enumerate(COCO_KEYPOINT_NAMES):  # by hand: x = xn * 200, y = yn * 200 - 50
        kpts += [0, 0, 0] if "ankle" in name else [round(0.11 + 0.04 * i, 2) * 200, 10 + 4 * i, 2]
    expected = _quiet_cocoeval(_kpt_gt(), [{"image_id": 3, "category_id": 1, "keypoints": kpts, "score": 1.0}],
                               "keypoints")  # fmt: skip
    got = keypoint_map([{"image_id": 3, "text": text}], _kpt_gt())
    assert list(got.values()) == pytest.approx(expected, abs=1e-6)
    assert 0.0 < got["AP"] < 1.0


# ----------------------------------------------------------------------------- CIDEr


def test_cider_matches_pycocoevalcap_on_pretokenised_text() -> None:
    from pycocoevalcap.cider.cider import Cider

    refs = [["a dog runs on the grass", "a dog is running"], ["a cat sits on a mat"], ["two men play chess"]]
    preds = ["A dog runs!", "a cat, sitting.", "Two men play chess."]
    want, _ = Cider().compute_score(
        {i: r for i, r in enumerate(refs)}, {0: ["a dog runs"], 1: ["a cat sitting"], 2: ["two men play chess"]}
    )
    assert cider(preds, refs) == pytest.approx(float(want))
    assert cider(["", "", ""], refs) == 0.0


# ----------------------------------------------------------------------------- whole files


def test_score_vqa_gqa_docvqa_chartqa() -> None:
    refs = [{"id": "a", "answers": ["2"] * 10}, {"id": "b", "answers": ["yes"] + ["no"] * 9}]
    preds = [{"id": "b", "text": "Yes"}, {"id": "a", "text": "Two"}]
    assert score("vqa", preds, refs) == {"accuracy": pytest.approx((1.0 + 0.3) / 2)}
    assert score("gqa", [{"id": 1, "text": "Table"}], [{"id": 1, "answer": "table"}]) == {"accuracy": 1.0}
    assert score("docvqa", [{"id": "x", "text": "hallo"}], [{"id": "x", "answers": ["hello"]}]) == {
        "anls": pytest.approx(0.8)
    }
    assert score("chartqa", [{"id": "x", "text": "98"}], [{"id": "x", "answer": "100"}]) == {"relaxed_accuracy": 1.0}


def test_score_rec_clips_predictions_to_the_image() -> None:
    # 640 x 480 (pad_y 80). GT [64, 0, 320, 40] px = frame (0.1, 0.125, 0.5, 0.1875). The prediction
    # (0.1, 0, 0.5, 0.1875) reaches into the padding: IoU 1/3 in the frame, 1.0 once cut to the image.
    refs = [{"id": "r1", "width": 640, "height": 480, "box": [64, 0, 320, 40]},
            {"id": "r2", "width": 640, "height": 480, "box": [64, 48, 320, 240]}]  # fmt: skip
    preds = [{"id": "r1", "text": "[0.1,0.0,0.5,0.1875]"}, {"id": "r2", "text": "I cannot tell."}]
    assert score("rec", preds, refs) == {"accuracy": 0.5}


def test_score_detection_builds_coco_from_references() -> None:
    refs = [
        {"id": "q1", "image_id": 1, "width": 640, "height": 480, "category_id": 1, "category": "dog",
         "boxes": [[64, 48, 320, 240], [400, 300, 500, 400]]},
        {"id": "q2", "image_id": 1, "width": 640, "height": 480, "category_id": 2, "boxes": [[0, 0, 100, 80]]},
        {"id": "q3", "image_id": 2, "width": 300, "height": 500, "category_id": 2, "boxes": [[0, 0, 300, 500]]},
        {"id": "q4", "image_id": 2, "width": 300, "height": 500, "category_id": 1, "boxes": []},
    ]  # fmt: skip
    preds = [
        {"id": "q1", "text": "[0.10,0.20,0.50,0.50;0.60,0.60,0.78,0.75;0.9,0.9,1.0,1.0]"},
        {"id": "q2", "text": "none"},
        {"id": "q3", "text": "[0.2,0.0,0.8,1.0]"},
        {"id": "q4", "text": "[0.3,0.3,0.4,0.4]"},
    ]
    direct = detection_map(
        [{"image_id": 1, "category_id": 1, "text": preds[0]["text"]}, {"image_id": 1, "category_id": 2, "text": ""},
         {"image_id": 2, "category_id": 2, "text": preds[2]["text"]},
         {"image_id": 2, "category_id": 1, "text": preds[3]["text"]}],
        _det_gt(),
    )  # fmt: skip
    assert score("layout", preds, refs) == pytest.approx(direct)
    refs[1] = {**refs[1], "width": 641}
    with pytest.raises(SphinxError, match="two sizes"):
        score("detection", preds, refs)


def test_score_keypoints() -> None:
    ref = {"id": "p1", "image_id": 3, "width": 200, "height": 100, "keypoints": _person_keypoints(),
           "bbox": [20, 10, 128, 64], "area": 5000.0}  # fmt: skip
    assert score("keypoints", [{"id": "p1", "text": _kpt_text()}], [ref])["AP"] == pytest.approx(1.0)
    with pytest.raises(SphinxError, match="51 numbers"):
        score("keypoints", [{"id": "p1", "text": ""}], [{**ref, "keypoints": [1, 2, 3]}])


def test_score_grounded_caption_and_ocr_pool_over_items() -> None:
    refs = [
        {"id": "g1", "width": 100, "height": 100,
         "phrases": [{"phrase": "a dog", "boxes": [[10, 10, 50, 50]]},
                     {"phrase": "ball", "boxes": [[60, 60, 70, 70]]}]},
        {"id": "g2", "width": 100, "height": 100, "phrases": [{"phrase": "tree", "boxes": [[0, 0, 100, 100]]}]},
    ]  # fmt: skip
    preds = [{"id": "g1", "text": "<p>Dog</p> [0.10,0.10,0.50,0.50] and <p>ball</p> [0.1,0.1,0.2,0.2]"},
             {"id": "g2", "text": "<p>a tree</p> [0.0,0.0,1.0,1.0]"}]  # fmt: skip
    assert score("grounded_caption", preds, refs) == {"phrase_recall": pytest.approx(2 / 3)}
    ocr_refs = [
        {
            "id": "o",
            "width": 200,
            "height": 100,
            "words": [{"text": "SALE", "box": [0, 0, 100, 50]}, {"text": "now", "box": [100, 50, 200, 100]}],
        }
    ]
    # 200 x 100, pad_y 50: [0, 0, 100, 50] px = frame (0, 0.25, 0.5, 0.5).
    ocr_preds = [{"id": "o", "text": "<p>sale</p> [0.00,0.25,0.50,0.50] <p>now</p> [0,0,0.1,0.1]"}]  # fmt: skip
    assert score("ocr", ocr_preds, ocr_refs) == {"word_recall": 0.5}


def test_score_caption() -> None:
    refs = [{"id": "c1", "captions": ["a dog runs"]}, {"id": "c2", "captions": ["a cat sleeps"]}]
    got = score("caption", [{"id": "c1", "text": "A dog runs."}, {"id": "c2", "text": "a bird"}], refs)
    assert set(got) == {"CIDEr"} and got["CIDEr"] > 0


def test_score_rejects_bad_files() -> None:
    refs = [{"id": "a", "answers": ["x"]}, {"id": "b", "answers": ["y"]}]
    with pytest.raises(SphinxError, match=r"1 references have no prediction: 'b'"):
        score("vqa", [{"id": "a", "text": "x"}], refs)
    with pytest.raises(SphinxError, match="no reference: 'c'"):
        score("vqa", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "c", "text": "z"}], refs)
    with pytest.raises(SphinxError, match="appears twice"):
        score("vqa", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], refs)
    with pytest.raises(SphinxError, match="no metric for task 'nope'"):
        score("nope", [], refs)
    with pytest.raises(SphinxError, match="lacks the field 'answers'"):
        score("vqa", [{"id": "a", "text": "x"}], [{"id": "a", "answer": "x"}])
    with pytest.raises(SphinxError, match="string 'text'"):
        score("vqa", [{"id": "a", "text": None}], [{"id": "a", "answers": ["x"]}])
    with pytest.raises(SphinxError, match="pixel box"):
        score("rec", [{"id": "a", "text": ""}], [{"id": "a", "width": 10, "height": 10, "box": [1, 2]}])
    with pytest.raises(SphinxError, match="positive numbers"):
        score("rec", [{"id": "a", "text": ""}], [{"id": "a", "width": "wide", "height": 10, "box": [0, 0, 1, 1]}])
    with pytest.raises(SphinxError, match="'boxes' must be a list"):
        bad = {"id": "a", "image_id": 1, "width": 9, "height": 9, "category_id": 1, "boxes": "[0, 0, 1, 1]"}
        score("detection", [{"id": "a", "text": ""}], [bad])


def test_registry_covers_the_task_metric_keys() -> None:
    from sphinx_mllm.tasks.registry import TASKS

    wanted = {t.metric for t in TASKS.values() if t.metric is not None}
    assert wanted <= set(METRICS)
    assert {"vqa", "gqa", "rec", "detection", "layout", "keypoints", "grounded_caption", "ocr", "docvqa",
            "chartqa", "caption"} <= set(METRICS)  # fmt: skip
