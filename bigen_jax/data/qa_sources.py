"""Question-answer annotations of VQA v2 and GQA, as per-image question lists for the feature extractor.

Both readers return ``{image: [{"question", "answers", "type", "question_id"}, ...]}``, each image's questions in
question-id order, the form ``features.extract.extract_split`` reads from a source example's ``"questions"``
(``coco.source(questions=...)`` attaches them; ``tools/extract_features.py --vqa_questions/--gqa_questions``):
  ``read_vqa``  VQA v2: questions JSON (``questions[]``: question_id, image_id, question) and, except for test
                splits, annotations JSON (``annotations[]``: question_id, answers[10].answer, answer_type,
                question_type); keyed by the COCO image id; 10 answers a question (``VQA_ANSWERS``).
  ``read_gqa``  GQA: questions JSON (question id -> imageId, question, answer, types{structural, semantic,
                detailed}), one or several files (``train_all_questions/*.json``); keyed by the Visual Genome
                image id (a string); 1 answer a question (``GQA_ANSWERS``). ``coco_ids`` and ``by_coco_id`` move
                them to COCO ids through Visual Genome's ``image_data.json`` (GQA's images are Visual Genome's,
                about half of them COCO's).
Answers are normalised by ``normalise_answer``, the VQA evaluation's processing.
"""

import json
import logging
import os
import re
from typing import Any, Iterable, Mapping

from bigen_jax.data import coco
from bigen_jax.data.records import DataError

VQA_ANSWERS = 10  # annotators per VQA v2 question: the records' max_answers
GQA_ANSWERS = 1
VQA_TYPE_FIELDS = ("answer_type", "question_type")
GQA_TYPE_FIELDS = ("structural", "semantic", "detailed")

# The VQA evaluation's answer processing (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/
# vqaEval.py: processPunctuation, processDigitArticle), reproduced for matching answers to each other.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written there: a period not followed by a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
# Its contractions table (words typed without the apostrophe), less the entries with capitals, which never
# match its lower-cased words.
_CONTRACTIONS = dict(pair.split(":") for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd "
    "howll:how'll hows:how's isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am "
    "mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't "
    "mustve:must've neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at "
    "'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's "
    "shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've "
    "somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll "
    "somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've "
    "someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've "
    "something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've "
    "there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've "
    "theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've "
    "weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's "
    "whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll "
    "whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've "
    "wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll "
    "y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd "
    "youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've").split())


def normalise_answer(answer: str) -> str:
  """An answer as the VQA evaluation compares it: whitespace collapsed; punctuation removed (deleted where it
  touches a space or the text has a digit-comma-digit, else a space; periods not before a digit deleted); lower
  case; number words to digits ("two" -> "2"); articles (a, an, the) dropped; contractions given their
  apostrophe ("dont" -> "don't")."""
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  out = text
  for p in _PUNCT:
    if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = _PERIOD_STRIP.sub("", out)
  words = [_NUMBERS.get(w, w) for w in out.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _check_type_field(type_field: str, allowed: tuple[str, ...], reader: str) -> None:
  if type_field not in allowed:
    raise ValueError(f"{reader}: type_field={type_field!r}, expected one of {allowed}")


def _group(items: Iterable[tuple[Any, Any, dict[str, Any]]]) -> dict[Any, list[dict[str, Any]]]:
  """(image, sort key, question) triples -> image -> its questions in sort-key order."""
  out: dict[Any, list[tuple[Any, dict[str, Any]]]] = {}
  for image, key, q in items:
    out.setdefault(image, []).append((key, q))
  return {image: [q for _, q in sorted(qs, key=lambda kq: kq[0])] for image, qs in out.items()}


def read_vqa(questions_file: str, annotations_file: str | None = None, *,
             type_field: str = "answer_type") -> dict[int, list[dict[str, Any]]]:
  """COCO image id -> its VQA v2 questions ``{"question", "answers" (normalised, 10), "type", "question_id"}``.
  Without ``annotations_file`` (test-dev, test) answers are empty and the type is "". ``type_field``:
  ``answer_type`` (yes/no, number, other: VQA's reported breakdown) or ``question_type`` (65 question prefixes)."""
  _check_type_field(type_field, VQA_TYPE_FIELDS, "read_vqa")
  data = coco.load_json(questions_file, "VQA questions file")
  questions = coco.json_field(data, "questions", questions_file, "the file")
  annotations: dict[int, dict[str, Any]] = {}
  if annotations_file:
    anns = coco.json_field(coco.load_json(annotations_file, "VQA annotations file"), "annotations",
                           annotations_file, "the file")
    for i, ann in enumerate(anns):
      where = f"annotations[{i}]"
      qid = int(coco.json_field(ann, "question_id", annotations_file, where))
      answers = coco.json_field(ann, "answers", annotations_file, where)
      annotations[qid] = {
          "answers": [normalise_answer(str(coco.json_field(a, "answer", annotations_file, f"{where}.answers[{j}]")))
                      for j, a in enumerate(answers)],
          "type": str(coco.json_field(ann, type_field, annotations_file, where))}
  items, missing = [], []
  for i, q in enumerate(questions):
    qid = int(coco.json_field(q, "question_id", questions_file, f"questions[{i}]"))
    image = int(coco.json_field(q, "image_id", questions_file, f"questions[{i}]"))
    text = str(coco.json_field(q, "question", questions_file, f"questions[{i}]")).strip()
    if annotations_file and qid not in annotations:
      missing.append(qid)
      continue
    ann = annotations.get(qid, {"answers": [], "type": ""})
    items.append((image, qid, {"question": text, "answers": ann["answers"], "type": ann["type"], "question_id": qid}))
  if missing:
    raise DataError(f"{len(missing)} questions of {questions_file} have no annotation in {annotations_file} "
                    f"(e.g. question ids {missing[:5]}): pass the annotations of the same split")
  return _group(items)


def _gqa_order(qid: str) -> tuple[int, str]:
  """GQA's question ids are digit strings: sorted as numbers (then as text)."""
  return (int(qid), qid) if qid.isdigit() else (-1, qid)


def read_gqa(questions_files: str | Iterable[str], *, type_field: str = "structural"
             ) -> dict[str, list[dict[str, Any]]]:
  """Visual Genome image id -> its GQA questions ``{"question", "answers" ([answer], normalised; [] in test
  files), "type" (``types[type_field]``), "question_id"}``; several files (``train_all_questions/*.json``) merged."""
  _check_type_field(type_field, GQA_TYPE_FIELDS, "read_gqa")
  files = [questions_files] if isinstance(questions_files, str) else list(questions_files)
  items = []
  for path in files:
    data = coco.load_json(path, "GQA questions file")
    if not isinstance(data, dict):
      raise DataError(f"{path}: expected a JSON object of question id -> question (GQA's format)")
    for qid, q in data.items():
      where = f"question {qid!r}"
      image = str(coco.json_field(q, "imageId", path, where))
      answers = [normalise_answer(str(q["answer"]))] if "answer" in q else []
      kind = str(coco.json_field(coco.json_field(q, "types", path, where), type_field, path, f"{where}.types"))
      items.append((image, _gqa_order(str(qid)), {"question": str(coco.json_field(q, "question", path, where)).strip(),
                                                  "answers": answers, "type": kind, "question_id": str(qid)}))
  return _group(items)


def coco_ids(image_data_file: str) -> dict[str, int]:
  """Visual Genome image id (as GQA writes it, a string) -> COCO image id, from VG's ``image_data.json``
  (``[{"image_id", "coco_id" or null, ...}]``); images that are not COCO's are left out."""
  data = coco.load_json(image_data_file, "Visual Genome image data file")
  if not isinstance(data, list):
    raise DataError(f"{image_data_file}: expected a JSON list of images (Visual Genome's image_data.json)")
  out = {}
  for i, im in enumerate(data):
    vg = coco.json_field(im, "image_id", image_data_file, f"[{i}]")
    coco_id = im.get("coco_id") if isinstance(im, dict) else None
    if coco_id is not None:
      out[str(vg)] = int(coco_id)
  return out


def by_coco_id(per_image: Mapping[str, list[dict[str, Any]]], vg_to_coco: Mapping[str, int]
               ) -> dict[int, list[dict[str, Any]]]:
  """GQA's per-image questions keyed by COCO id instead; images without one are dropped with a warning."""
  out: dict[int, list[dict[str, Any]]] = {}
  dropped = [image for image in per_image if image not in vg_to_coco]
  for image, qs in per_image.items():
    if image in vg_to_coco:
      out.setdefault(vg_to_coco[image], []).extend(qs)
  if dropped:
    logging.warning("%d of %d GQA images (%d questions) are not COCO images and are left out (e.g. %s)",
                    len(dropped), len(per_image), sum(len(per_image[i]) for i in dropped), sorted(dropped)[:3])
  return out


def merge(*per_image: Mapping[Any, list[dict[str, Any]]]) -> dict[Any, list[dict[str, Any]]]:
  """Several readers' per-image questions as one: each image's lists concatenated in argument order."""
  out: dict[Any, list[dict[str, Any]]] = {}
  for d in per_image:
    for image, qs in d.items():
      out.setdefault(image, []).extend(qs)
  return out
