"""Label vocabularies shared by the generator, the readers and the evaluation."""

from __future__ import annotations

# AffectNet-8 order (also used by SynthFace). FER2013 and RAF-DB map into it in data_shards.evalsets.
EXPRESSIONS: tuple[str, ...] = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
EXPRESSION_INDEX = {name.lower(): i for i, name in enumerate(EXPRESSIONS)}
UNKNOWN = -1
