"""What a rater is asked (the protocols, the rubric, the aspects) and which answers the
workbench takes: the checks of an answer and the form token that makes it good for one
answer."""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

from rewards.sheet import ASPECT_MAX, ASPECTS, RATING_VALUES

#: The rating protocols a round can be served with.
PROTOCOLS: dict[str, str] = {
    "cs787": "one rating per image: 1 poor, 2 fair, 3 good (the IIT Kanpur CS787 study)",
    "aspects": "the overall 1-3 rating and six aspects scored 0-10 (Prompt-to-Polyp)",
}
RUBRIC: dict[int, str] = {
    1: "Poor: not usable; anatomy, colour or sharpness clearly wrong, or it does not show "
    "what the prompt asks",
    2: "Fair: plausible with visible flaws; usable with care",
    3: "Good: indistinguishable from a real photograph of what the prompt describes",
}
ASPECT_HELP: dict[str, str] = {
    "clinical_realism": "how much it looks like a real clinical image (0 not at all, 10 "
    "indistinguishable)",
    "prompt_faithfulness": "how well it shows what the prompt describes (eye, findings, grade)",
    "abnormality_detectability": "how clearly the abnormalities the prompt names can be seen",
    "colour_contrast": "how natural the colour and contrast are",
    "intra_set_diversity": "how different it is from the other images of the same prompt "
    "you have seen",
    "confidence_of_use": "how confident you would be to use it for training or teaching",
}
MAX_COMMENT = 2000


class WorkbenchError(ValueError):
    """A refused request: ``status`` is the HTTP status the app answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_answer(
    protocol: str, rating: Any, aspects: dict[str, Any] | None, comment: str
) -> tuple[int, dict[str, float]]:
    """The rating and the aspects given (as floats) of an answer under ``protocol``:
    WorkbenchError 422 unless the rating is 1-3, the aspects are what the protocol asks
    (all six from 0 to 10, or none) and the comment is text of at most :data:`MAX_COMMENT`
    characters."""
    if isinstance(rating, bool) or not isinstance(rating, int) or rating not in RATING_VALUES:
        raise WorkbenchError(422, f"rating {rating!r}: 1 (poor), 2 (fair) or 3 (good)")
    aspects = dict(aspects or {})
    unknown = sorted(set(aspects) - set(ASPECTS))
    if unknown:
        raise WorkbenchError(422, f"unknown aspects {unknown}; known: {', '.join(ASPECTS)}")
    clean: dict[str, float] = {}
    for name in ASPECTS:
        value = aspects.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WorkbenchError(422, f"{name} {value!r}: a number from 0 to 10")
        if not (math.isfinite(value) and 0 <= value <= ASPECT_MAX):
            raise WorkbenchError(422, f"{name} {value!r}: a number from 0 to 10")
        clean[name] = float(value)
    if protocol == "aspects" and len(clean) != len(ASPECTS):
        missing = [a for a in ASPECTS if a not in clean]
        raise WorkbenchError(422, f"this round rates all six aspects; missing: {missing}")
    if protocol == "cs787" and clean:
        raise WorkbenchError(422, "this round (cs787) takes the 1-3 rating only, no aspects")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise WorkbenchError(422, f"comment: text of at most {MAX_COMMENT} characters")
    return rating, clean


def form_token(secret: bytes, item_id: str, answers: int) -> str:
    """Good for the answer after the item's ``answers``-th: HMAC of the round's secret."""
    msg = f"{item_id}:{answers}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:32]
