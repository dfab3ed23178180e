"""Caption metrics, computed the way papers compute them (pycocoevalcap).

Captions are tokenised with ``jaxcap.data.text.normalize`` (lowercase, no
punctuation), which is what pycocoevalcap's PTB tokenizer produces for plain
caption text, without starting Java.
"""

from __future__ import annotations

from jaxcap.data.text import normalize


def bleu(references: dict, hypotheses: dict) -> list[float]:
    """BLEU-1..4 of ``hypotheses`` ({id: caption}) against ``references`` ({id: [captions]})."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts = {key: [normalize(r) for r in refs] for key, refs in references.items()}
    res = {key: [normalize(hypotheses[key])] for key in references}
    if not gts:
        return [0.0] * 4
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in score]
