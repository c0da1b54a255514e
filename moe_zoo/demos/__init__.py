"""The ``moe-zoo demo`` jobs.

- :mod:`moe_zoo.demos.moe_llava` (``moe-zoo demo``, the main job): MoE-LLaVA's three-stage MoE-tuning of
  SmolLM2-135M-Instruct with a digits vision tower, held-out accuracy after each stage and a plot of expert load.
- :mod:`moe_zoo.demos.upcycling` (``moe-zoo upcycle-demo``): SmolLM2 upcycled into an MoE, shown to compute the same
  function, saved, reloaded and chatted with.
- :mod:`moe_zoo.demos.uni_moe` (``moe-zoo uni-moe-demo``): Uni-MoE's three stages on digit images and spoken digits
  with SmolLM2 and Whisper tiny.en, held-out accuracy per modality and the routing by modality.
- :mod:`moe_zoo.demos.metis_home` (``moe-zoo metis-home-demo``): SmolLM2 split into Metis-HOME's thinking and
  non-thinking branches, SFT on an offline reasoning / direct-answer mix, the router's held-out accuracy and the
  thinking ratio per task type.

Every check a demo makes raises :class:`DemoCheckError` when it fails.
"""

from __future__ import annotations


class DemoCheckError(AssertionError):
    """One of a demo's checks failed."""


def check(ok: bool, message: str) -> None:
    """Raise :class:`DemoCheckError` with ``message`` unless ``ok``."""
    if not ok:
        raise DemoCheckError(message)


__all__ = ["DemoCheckError", "check"]
