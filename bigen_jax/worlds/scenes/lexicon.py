"""The words of the captioned-scenes world and the geometry behind its relation words.

Word categories (``SHAPES``, ``COLOURS``, ``SIZES``, ``NUMBERS``, ``RELATIONS``) are what hard negatives swap
and what evaluators score. No word a noun phrase puts after "a" starts with a vowel, so swapping one word never
needs a new article.
"""

from typing import Any, Mapping

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan", "white", "black")
SIZES = ("small", "large")
NUMBERS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")

# Caption words → the attribute value they name (synonyms kept few and mapped).
SHAPE_SINGULAR = {"circle": "circle", "disc": "circle", "square": "square", "box": "square",
                  "triangle": "triangle", "star": "star", "diamond": "diamond", "cross": "cross",
                  "hexagon": "hexagon"}
SHAPE_PLURAL = {"circles": "circle", "discs": "circle", "squares": "square", "boxes": "square",
                "triangles": "triangle", "stars": "star", "diamonds": "diamond", "crosses": "cross",
                "hexagons": "hexagon"}
PLURAL_OF = {"circle": "circles", "disc": "discs", "square": "squares", "box": "boxes",
             "triangle": "triangles", "star": "stars", "diamond": "diamonds", "cross": "crosses",
             "hexagon": "hexagons", "shape": "shapes", "object": "objects"}
SYNONYMS = {"circle": ("circle", "disc"), "square": ("square", "box")}
GENERIC_SINGULAR = ("shape", "object")
GENERIC_PLURAL = ("shapes", "objects")
SIZE_WORDS = {"small": "small", "large": "large", "big": "large"}
NUMBER_VALUE = {w: i + 1 for i, w in enumerate(NUMBERS)}
PLURAL_NUMBERS = ("two", "three", "four")
RELATION_SWAPS = {"left": "right", "right": "left", "above": "below", "below": "above"}

# Hard-negative categories, in the order ``hard_negatives`` returns them.
NEGATIVE_CATEGORIES = ("shape", "colour", "number", "relation", "size")
# Captions must fit 17 WordPiece tokens with [CLS] and [SEP]: whole words, no punctuation, and slack for two
# words a pretrained BERT vocabulary may split (e.g. "hexagons").
MAX_WORDS = 13
# Every answer a question can have.
ANSWERS = ("yes", "no") + NUMBERS + COLOURS + SHAPES + SIZES + BACKGROUNDS


def relation_holds(a: Mapping[str, Any], rel: str, b: Mapping[str, Any], margin: float) -> bool:
  """Whether object ``a`` is ``rel`` object ``b``: centres differ by more than ``margin`` pixels on that axis."""
  if rel == "left of":
    return a["x"] + margin < b["x"]
  if rel == "right of":
    return a["x"] > b["x"] + margin
  if rel == "above":
    return a["y"] + margin < b["y"]
  if rel == "below":
    return a["y"] > b["y"] + margin
  raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")
